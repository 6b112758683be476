"""How one iteration's data flows: nested configs that reload exactly, the engine config reaching every
engine (and CUDA picked by default where it exists), the sampled token ids reaching DPO unchanged, and one
top-level Python name beside the other `kernels` package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfreward import cli
from selfreward.infer.config import EngineConfig, resolve_device
from selfreward.recipes.pipeline import run_stage, run_stages
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import RECIPE, LoopConfig, main as loop_main, stage_candidates, \
    stage_pairs, stage_prompts
from selfreward.recipes.session import Session
from selfreward.records import read_jsonl, write_jsonl
from conftest import ROOT
from recipes_tiny import SEEDS, loop_config, tiny_chat_model, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("m") / "m1")


def test_nested_flags_and_config_json_reload_exactly(tmp_path):
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--init-model", "M1", "--judge-k", "5", "--candidates-n", "8",
            "--candidates-temperature", "1.0", "--dpo-beta", "0.2", "--dpo-lr", "3e-6", "--engine-dtype",
            "bfloat16", "--instruct-rouge-threshold", "0.5", "--judge-template", "short", "--no-engine-prefix-cache"]
    ns = cli.parser(LoopConfig, skip={"dpo": {"model"}}).parse_args(argv)
    cfg = cli.build(LoopConfig, ns)
    assert (cfg.judge.k, cfg.candidates.n, cfg.candidates.temperature) == (5, 8, 1.0)
    assert (cfg.dpo.beta, cfg.dpo.lr, cfg.engine.dtype, cfg.engine.prefix_cache) == (0.2, 3e-6, "bfloat16", False)
    assert cfg.instruct.rouge_threshold == 0.5 and cfg.judge.template == "short"
    assert cfg.candidates.max_tokens == 512 and cfg.dpo.epochs == 1           # untouched defaults
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cli.to_dict(cfg)))
    again = cli.build(LoopConfig, cli.parser(LoopConfig).parse_args(["--config", str(path)]))
    assert again == cfg and cli.to_dict(again) == json.loads(path.read_text())
    over = cli.build(LoopConfig, cli.parser(LoopConfig).parse_args(["--config", str(path), "--judge-k", "2"]))
    assert over.judge.k == 2 and over.candidates.n == 8                       # a flag over the file
    with pytest.raises(cli.ConfigError, match="unknown field 'nope'"):
        cli.from_dict(LoopConfig, {"judge": {"nope": 1}})
    with pytest.raises(SystemExit):                                           # the loop sets DPO's model itself
        cli.parser(LoopConfig, skip={"dpo": {"model"}}).parse_args(["--dpo-model", "x"])


def test_default_device_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(EngineConfig()) == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device(EngineConfig()) == ("cuda:0", torch.bfloat16)
    monkeypatch.setenv("LOCAL_RANK", "3")                                     # torchrun: each rank its own GPU
    assert resolve_device(EngineConfig()) == ("cuda:3", torch.bfloat16)
    assert resolve_device(EngineConfig(device="cpu", dtype="float16")) == ("cpu", torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        resolve_device(EngineConfig(dtype="fp8"))


def test_loop_engines_get_the_configured_device_and_dtype(tiny, tmp_path, monkeypatch):
    """--engine-dtype bfloat16 reaches the engines of the loop's stages: their weights are bf16."""
    from selfreward.infer import config
    seen = []
    real = config.load_engine

    def spy(path, cfg):
        eng = real(path, cfg)
        seen.append((path, cfg, next(eng.model.parameters()).dtype, str(next(eng.model.parameters()).device)))
        return eng
    monkeypatch.setattr(config, "load_engine", spy)
    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(tiny), n_prompts=2, n_candidates=2,
                      max_tokens=4, prompt_source=str(write_prompts(tmp_path / "p.jsonl", SEEDS[:2])),
                      engine={"device": "cpu", "dtype": "bfloat16"})
    s = Session(cfg.engine)
    for st in ("prompts", "candidates"):
        run_stage(RECIPE, cfg, st, 1, s)
    assert seen and all(c is cfg.engine and dt == torch.bfloat16 and dev == "cpu" for _, c, dt, dev in seen)
    assert len(read_jsonl(folder(cfg, 1) / "candidates.jsonl")) == 4
    # the world demo's flag reaches its loop and measurements the same way
    from selfreward.recipes.world.demo import DemoConfig
    d = cli.build(DemoConfig, cli.parser(DemoConfig).parse_args(["--engine-dtype", "bfloat16"]))
    assert d.engine == EngineConfig(dtype="bfloat16")


def test_dpo_trains_on_the_sampled_ids_not_re_encoded_text(tiny, tmp_path):
    """Candidates keep their sampled ids; pairs carry them; train/data.py's pairs (what train/dpo.py trains
    on) are exactly prompt ids as given to the sampler + sampled ids + the end token, also where the text
    re-encodes to other ids."""
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train.data import load_pairs
    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(tiny), n_prompts=8, n_candidates=4,
                      max_tokens=24, temperature=1.0, prompt_source=str(write_prompts(tmp_path / "p.jsonl", SEEDS)))
    s = Session(cfg.engine)
    stage_prompts(cfg, 1, s)
    eng, tok = s.get(str(tiny))
    given = []
    real = eng.generate
    eng.generate = lambda ids, *a, **k: given.extend(ids) or real(ids, *a, **k)
    stage_candidates(cfg, 1, s)
    cands = read_jsonl(folder(cfg, 1) / "candidates.jsonl")
    assert all(c["token_ids"] and tok.eos_id not in c["token_ids"] for c in cands)
    assert [tok.decode(c["token_ids"]) for c in cands] == [c["text"] for c in cands]
    differs = [c for c in cands if tok.encode(c["text"]) != c["token_ids"]]
    assert differs, "the test needs a candidate whose text re-encodes to other ids"
    # a judge that ranks by sample index, so every prompt makes one pair between distinct texts
    judg = [{"id": c["id"], "sample": c["sample"], "k": 0, "judgment": "", "score": float(4 - c["sample"])}
            for c in cands]
    write_jsonl(folder(cfg, 1) / "judgments.jsonl", judg)
    stage_pairs(cfg, 1)
    pairs = read_jsonl(folder(cfg, 1) / "pairs.jsonl")
    assert pairs
    by = {(c["id"], c["sample"]): c for c in cands}
    prompt_ids = {p["id"]: tok.user_ids(p["prompt"]) for p in read_jsonl(folder(cfg, 1) / "prompts.jsonl")}
    assert sorted(map(tuple, given)) == sorted(tuple(v) for v in prompt_ids.values())
    trained, _ = load_pairs([str(folder(cfg, 1) / "pairs.jsonl")], Tokenizer.load(tiny), 512, 256)
    end = tok.render_response("")
    moved = 0
    for p, t in zip(pairs, trained):
        chosen, rejected = by[(p["id"], p["chosen_sample"])], by[(p["id"], p["rejected_sample"])]
        assert t.prompt == prompt_ids[p["id"]] == p["prompt_token_ids"]
        assert t.chosen == chosen["token_ids"] + end and t.rejected == rejected["token_ids"] + end
        moved += any(tok.encode(c["text"]) != c["token_ids"] for c in (chosen, rejected))
    assert moved, "no pair holds a candidate whose text re-encodes differently"
    # a text-only pair from a user still trains (re-encoded from its text)
    user = tmp_path / "user.jsonl"
    write_jsonl(user, [{"prompt": "Hi", "chosen": "Hello there", "rejected": "No"}])
    (u,), _ = load_pairs([str(user)], tok, 512, 256)
    assert u.chosen == tok.render_response("Hello there")


def test_stage_cli_flags_reach_the_stage(tiny, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", SEEDS[:3])
    argv = ["--run-dir", str(tmp_path / "r"), "--init-model", str(tiny), "--prompt-source", str(prompts),
            "--n-prompts", "3", "--candidates-n", "3", "--candidates-max-tokens", "5", "--stage"]
    from selfreward.records import DataError
    with pytest.raises(DataError, match=r"prompts.jsonl: missing \(run the prompts stage"):
        loop_main(argv + ["candidates"])
    loop_main(argv + ["prompts"])
    m = loop_main(argv + ["candidates"])
    assert m["settings"]["candidates"]["n"] == 3
    cands = read_jsonl(tmp_path / "r" / "iter_1" / "candidates.jsonl")
    assert len(cands) == 9 and all(len(c["token_ids"]) <= 5 for c in cands)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_the_checkout_hides_no_kernels_package(tiny, tmp_path, where):
    """issue 27: the PyPI `kernels` package (transformers requires it) is installed beside ours. From the checkout's
    root (the working directory is on sys.path for `python -c`, `python -m`, pytest) and from any other folder,
    `import kernels` is theirs, our ops are `selfreward.kernels.ops`, and transformers loads a model (its hub-kernel
    integration imports `kernels`: with the old `kernels/__init__.py` it died there); infer/sample.py runs."""
    cwd = ROOT if where == "root" else tmp_path
    code = ("import sys, kernels, selfreward.kernels.ops as K, selfreward; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(tiny)!r}); "
            "print(kernels.__file__); print(K.__file__); print(selfreward.__file__); print(repr(sys.path[0]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs, ours, pkg, first = r.stdout.split()[-4:]
    assert first == "''"                       # the working directory really was searched first
    assert Path(ours).resolve() == (ROOT / "kernels" / "ops.py").resolve()
    assert Path(theirs).resolve().parent != (ROOT / "kernels").resolve() and "site-packages" in theirs
    assert Path(pkg).resolve() == (ROOT / "__init__.py").resolve()
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "infer" / "sample.py"), "--model", str(tiny), "--input", str(inp),
                        "--output", str(tmp_path / "out.jsonl"), "--max-tokens", "4"], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1


def test_manifest_counts_are_the_pairs_written_under_min_margin(tiny, tmp_path):
    """issue 13 item 4: the manifest's counts come from the pairs stage itself (min_margin included)."""
    from selfreward.recipes.self_reward import write_manifest
    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(tiny), min_margin=2.0)
    it = folder(cfg, 1)
    write_jsonl(it / "prompts.jsonl", [{"id": p, "prompt": f"Q {p}?", "source": "given", "verdict": "ok"}
                                        for p in "abc"])
    write_jsonl(it / "candidates.jsonl", [{"id": p, "sample": s, "text": f"{p}{s}", "n_tokens": 2}
                                           for p in "abc" for s in range(2)])
    gaps = {"a": (5, 1), "b": (4, 3), "c": (3, 3)}    # a: gap 4 (a pair), b: gap 1 (< 2), c: a tie
    write_jsonl(it / "judgments.jsonl", [{"id": p, "sample": s, "k": 0, "judgment": "", "score": float(gaps[p][s])}
                                          for p in "abc" for s in range(2)])
    m = write_manifest(cfg, 1, {}, stage_pairs(cfg, 1))
    pairs = read_jsonl(it / "pairs.jsonl")
    assert [p["id"] for p in pairs] == ["a"] and m["counts"]["pairs"] == len(pairs) == 1
    assert (m["counts"]["below_margin"], m["counts"]["ties"]) == (1, 1)
    assert json.loads((it / "manifest.json").read_text())["counts"] == m["counts"]


def test_checkpoint_selection_in_the_loop(tiny, tmp_path):
    """issue 13 item 5, wired: with select_every, DPO exports every N steps, each export (and the final one)
    is judged against M_t on held-out prompts, the winner is M_{t+1}, the choice and scores are in the
    manifest."""
    held = write_prompts(tmp_path / "held.jsonl", SEEDS[:3])
    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(tiny), n_prompts=4, n_candidates=2,
                      max_tokens=6, judge_k=1, judge_max_tokens=6, judge_template="short", score_from="expected",
                      prompt_source=str(write_prompts(tmp_path / "p.jsonl", SEEDS)), select_every=1,
                      select={"prompts": str(held), "max_tokens": 6},
                      dpo=dict(max_steps=2, batch_size=2, max_length=128, lr=1e-3, warmup_steps=0))
    m = run_stages(RECIPE, cfg, 1, Session(cfg.engine), RECIPE.body)
    it = folder(cfg, 1)
    sel = json.loads((it / "select.json").read_text())
    names = [Path(s["candidate"]).name for s in sel["scores"]]
    assert names == ["step_1", "step_2", "final"] and m["selection"] == sel
    assert all(s["wins"] + s["ties"] + s["losses"] == 3 for s in sel["scores"])
    chosen = Path(sel["chosen"])
    assert (chosen / "model.safetensors").read_bytes() == (it / "model" / "model.safetensors").read_bytes()
    with pytest.raises(cli.ConfigError, match="--select-prompts"):
        loop_config(run_dir="x", select_every=5)
