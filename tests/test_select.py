"""Issue 13 item 5: checkpoint selection. DPO's --export-every writes the candidates; recipes.select judges
each against M_t head-to-head (both orders) with a scripted judge that prefers marked replies, and keeps the
one with the most wins."""
import json
import shutil

import pytest

from conftest import TOKENIZER_DIR
from scripted import MARK, ScriptedEngine, pairwise_judge

PROMPTS = ["Name a red fruit.", "Say hi to the cat.", "What is two plus two?"]


def test_dpo_export_every(tmp_path):
    from safetensors.torch import load_file

    from selfreward.model.checkpoint import load_model
    from selfreward.train import dpo
    from test_train_fixtures import dpo_records, make_model, make_spm, write_jsonl
    model = make_model(tmp_path / "m0", make_spm(tmp_path / "spm"))
    data = write_jsonl(tmp_path / "pairs.jsonl", dpo_records(8, seed=2))
    out = tmp_path / "dpo"
    dpo.main(["--model", str(model), "--data", str(data), "--output", str(out), "--batch-size", "4",
              "--max-steps", "4", "--export-every", "2", "--lr", "1e-3", "--max-length", "40", "--dropout", "0"])
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step_2", "step_4"]   # no temp folder left
    w2, w4 = (load_file(str(out / "exports" / s / "model.safetensors")) for s in ("step_2", "step_4"))
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all((w4[k] == final[k]).all() for k in final)            # the step-4 export is the final policy
    assert any((w2[k] != w4[k]).any() for k in w4)                  # and step 2 an earlier one
    assert (out / "exports" / "step_2" / "tokenizer.model").exists()
    load_model(out / "exports" / "step_2")                          # a loadable HF folder


def _ckpt(path, tag):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_text(tag)                  # stands for the weights: copied as is
    shutil.copy(TOKENIZER_DIR / "tokenizer.model", path)
    return str(path)


@pytest.fixture
def scripted_models(tmp_path, monkeypatch):
    """Checkpoint folders whose 'model' answers with a mark on the prompts listed for it; every engine also
    judges pairwise (the reference is the judge, as in the self-judging loop), preferring the marked reply."""
    from selfreward.infer import config
    from selfreward.model.tokenizer import Tokenizer
    marks = {"ref": set(), "step_2": {0}, "step_4": {0, 1, 2}, "step_6": set(), "step_8": {0, 1}}
    paths = {name: _ckpt(tmp_path / name, name) for name in marks}
    judge = pairwise_judge()
    loaded = []

    def engine_for(path, **kw):
        name = next(n for n, p in paths.items() if p == str(path))
        loaded.append(name)

        def reply(text, seed, j):
            if "Reply 1:" in text:
                return judge(text, seed, j)
            i = next(k for k, p in enumerate(PROMPTS) if p in text)
            return f"answer {i} of {name}" + (f" {MARK}" if i in marks[name] else "")
        return ScriptedEngine(Tokenizer.load(path), reply, max_len=2048)
    real = config.load_engine          # a model on a server (--judge-url): the real client engine
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None, *a: real(path, cfg, *a) if cfg and cfg.url
                        else engine_for(path))
    return paths, loaded


def test_select_keeps_the_checkpoint_with_most_wins(tmp_path, scripted_models):
    from selfreward.recipes.select import select_checkpoint
    paths, loaded = scripted_models
    cands = [paths[n] for n in ("step_2", "step_4", "step_6", "step_8")]
    res = select_checkpoint(cands, paths["ref"], PROMPTS, paths["ref"], out=tmp_path / "chosen")
    got = {s["candidate"].rsplit("/", 1)[1]: (s["wins"], s["ties"], s["losses"]) for s in res["scores"]}
    # marked on k prompts: k wins (both orders prefer the mark), the rest ties (a position-biased judge)
    assert got == {"step_2": (1, 2, 0), "step_4": (3, 0, 0), "step_6": (0, 3, 0), "step_8": (2, 1, 0)}
    assert res["chosen"] == paths["step_4"] and res["chosen_index"] == 1 and res["n_prompts"] == 3
    assert (tmp_path / "chosen" / "model.safetensors").read_text() == "step_4"
    assert (tmp_path / "chosen" / "tokenizer.model").exists()
    assert loaded.count("ref") == 2                 # reference answers once, then judges once


def test_select_tie_rule():
    from selfreward.recipes.select import pick
    s = lambda w, l: {"wins": w, "losses": l}   # noqa: E731
    assert pick([s(2, 1), s(3, 0), s(1, 0)]) == 1            # most wins
    assert pick([s(2, 1), s(2, 0), s(2, 2)]) == 1            # then fewest losses
    assert pick([s(2, 0), s(1, 0), s(2, 0)]) == 2            # then the later (further-trained) one


def test_select_cli_report_and_bad_input(tmp_path, scripted_models):
    from selfreward.records import DataError
    from selfreward.recipes.select import main
    paths, _ = scripted_models
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    res = main(["--candidates", paths["step_6"], paths["step_8"], "--reference", paths["ref"], "--prompts", str(pf),
                "--out", str(tmp_path / "m"), "--report", str(tmp_path / "sel.json"), "--engine-device", "cpu"])
    assert res["chosen"] == paths["step_8"] and json.loads((tmp_path / "sel.json").read_text())["chosen"] == res["chosen"]
    assert (tmp_path / "m" / "model.safetensors").read_text() == "step_8"
    # bad input: errors that name the file, line and field (cli.run_main prints them as `error: ...`, exit 2)
    pf.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: .*'prompt'"):
        main(["--candidates", paths["step_6"], "--reference", paths["ref"], "--prompts", str(pf)])
    pf.write_text('{"prompt": "ok"}\n')
    with pytest.raises(DataError, match="nope: not a checkpoint folder"):
        main(["--candidates", str(tmp_path / "nope"), "--reference", paths["ref"], "--prompts", str(pf)])


def test_select_cli_exit_code(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    r = subprocess.run([sys.executable, "-m", "selfreward.recipes.select", "--candidates", str(tmp_path / "x"),
                        "--reference", str(tmp_path / "y"), "--prompts", str(tmp_path / "none.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "none.jsonl: no such file" in r.stderr, r.stderr


def _cli(tmp_path, paths, *extra):
    pf = tmp_path / "p.jsonl"
    if not pf.exists():
        pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ["--candidates", paths["step_6"], paths["step_8"], "--reference", paths["ref"], "--prompts", str(pf),
            "--engine-device", "cpu", *map(str, extra)]


def test_select_never_writes_over_an_input(tmp_path, scripted_models):
    """Issue 33 case 1: --out equal to --reference (the input model replaced by a candidate) or to a candidate,
    or a folder holding one, is refused naming both flags, before any model loads; the input is unchanged."""
    from selfreward.cli import ConfigError
    from selfreward.recipes.select import main
    paths, loaded = scripted_models
    for out, flag in ((paths["ref"], "--reference"), (paths["step_8"], "--candidates"), (tmp_path, "--reference")):
        with pytest.raises(ConfigError, match=f"^--out {out}: is {flag} "):
            main(_cli(tmp_path, paths, "--out", out))
    with pytest.raises(ConfigError, match=r"--report .*p\.jsonl: is --prompts"):
        main(_cli(tmp_path, paths, "--report", tmp_path / "p.jsonl"))
    assert loaded == []
    assert (tmp_path / "ref" / "model.safetensors").read_text() == "ref"
    assert (tmp_path / "step_8" / "model.safetensors").read_text() == "step_8"


def test_select_keeps_the_output_rules(tmp_path, scripted_models):
    """Issue 33 cases 2 and 3: an existing --out folder or --report file that select did not write is refused
    (left as it was) unless --overwrite; select records what made its output (OUT.meta.json) and refuses a
    rerun with other settings over it; a rerun of the same run may replace its own output and report."""
    from selfreward.records import DataError
    from selfreward.recipes.select import main
    paths, _ = scripted_models
    out, rep = tmp_path / "m", tmp_path / "sel.json"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rep.write_text("my report")
    with pytest.raises(DataError, match=r"m: exists and this command did not write it .*--overwrite"):
        main(_cli(tmp_path, paths, "--out", out))
    with pytest.raises(DataError, match=r"sel\.json: exists and this command did not write it .*--overwrite"):
        main(_cli(tmp_path, paths, "--report", rep))
    assert (out / "notes.txt").read_text() == "mine" and rep.read_text() == "my report"
    main(_cli(tmp_path, paths, "--out", out, "--report", rep, "--overwrite"))
    # step_8 is marked on 2 prompts, step_6 on none: step_8 is chosen, the folder is its copy and nothing else
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "model.safetensors").read_text() == "step_8"
    assert json.loads(rep.read_text())["chosen"] == paths["step_8"]
    made = json.loads((tmp_path / "m.meta.json").read_text())["made_by"]
    assert made["seed"] == 0 and made["limit"] == 0 and len(made["candidates"]) == 2
    assert json.loads((tmp_path / "sel.json.meta.json").read_text())["made_by"] == made
    main(_cli(tmp_path, paths, "--out", out, "--report", rep))            # the same run again: its own output
    with pytest.raises(DataError, match=r"m: made with other settings or inputs \(limit: 0 -> 2\)"):
        main(_cli(tmp_path, paths, "--out", out, "--limit", "2"))
    with pytest.raises(DataError, match=r"sel\.json: made with other settings or inputs \(seed: 0 -> 1\)"):
        main(_cli(tmp_path, paths, "--report", rep, "--seed", "1"))
    assert (out / "model.safetensors").read_text() == "step_8"


@pytest.fixture
def judge_server(tmp_path):
    """A judge checkpoint (tiny, byte-level tokenizer) and a stub OpenAI-compatible server (tests/test_external.py's)
    that judges as the scripted judge does: it reads the prompt's ids with the judge's tokenizer and answers the
    ids of its verdict. -> (judge dir, start(root) -> the stub; every stub is closed at the end)."""
    from hf_tiny import make_hf_checkpoint
    from hf_tokenizer import make_hf_tokenizer
    from selfreward.model.tokenizer import Tokenizer
    from test_external import Stub, choice
    judge = tmp_path / "judge"
    make_hf_checkpoint(judge, vocab=300, max_position_embeddings=4096)   # room for the judge prompt
    make_hf_tokenizer(judge)
    tok, verdict, stubs = Tokenizer.load(judge), pairwise_judge(), []

    def start(root=str(judge)):
        stubs.append(Stub(root, lambda b: (200, {"choices": [choice(tok.encode(verdict(tok.decode(b["prompt"]),
                                                                                            0, 0)), "length")]})))
        return stubs[-1]
    yield judge, start
    for st in stubs:
        st.close()


def test_select_judge_on_a_server(tmp_path, scripted_models, judge_server):
    """--judge J --judge-url URL: every verdict comes from the server (both orders of every prompt, for each
    candidate), the replies from the local engines, the result is the local judge's (test above); the judge's
    path is needed, and a server of another model is refused naming --judge-url."""
    from selfreward.cli import ConfigError
    from selfreward.records import DataError
    from selfreward.recipes.select import main
    paths, loaded = scripted_models
    judge, start = judge_server
    stub = start()
    res = main(_cli(tmp_path, paths, "--judge", judge, "--judge-url", stub.url))
    got = {s["candidate"].rsplit("/", 1)[1]: (s["wins"], s["ties"], s["losses"]) for s in res["scores"]}
    assert got == {"step_6": (0, 3, 0), "step_8": (2, 1, 0)} and res["chosen"] == paths["step_8"]
    assert len(stub.bodies) == 2 * 2 * len(PROMPTS) and {b["model"] for b in stub.bodies} == {"served"}
    assert loaded == ["ref", "step_6", "step_8"]                  # the replies only: no local judge
    assert res["judge"] == str(judge) and res["judge_url"] == stub.url
    with pytest.raises(ConfigError, match="^--judge-url needs --judge"):
        main(_cli(tmp_path, paths, "--judge-url", stub.url))
    other = start(str(tmp_path / "other" / "model"))
    with pytest.raises(DataError, match=f"^--judge-url {other.url} serves .*other/model, but this stage needs"):
        main(_cli(tmp_path, paths, "--judge", judge, "--judge-url", other.url))


def test_loop_select_judge_url(tmp_path, scripted_models, judge_server):
    """The loop's --select-judge J --select-judge-url URL: parsed into its selection, the judge's path required
    (named with the loop's flags), and its selection (select_from_run on a DPO run's exports and final model)
    judged by the server alone."""
    from selfreward import cli
    from selfreward.recipes.loop_config import LoopConfig
    from selfreward.recipes.select import select_from_run
    paths, loaded = scripted_models
    judge, start = judge_server
    stub = start()
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = ["--run-dir", tmp_path / "run", "--init-model", paths["ref"], "--select-every", 2, "--select-prompts", pf,
            "--select-judge-url", stub.url]
    with pytest.raises(cli.ConfigError, match="^--select-judge-url needs --select-judge"):
        cli.parse_config(LoopConfig, list(map(str, base)))
    cfg = cli.parse_config(LoopConfig, list(map(str, base + ["--select-judge", judge])))
    run = tmp_path / "dpo"
    (run / "exports").mkdir(parents=True)
    shutil.copytree(paths["step_2"], run / "exports" / "step_2")
    shutil.copytree(paths["step_4"], run / "final")
    # the scripted models answer there as they did: step_2 marked on 1 prompt, step_4 (the final one) on 3
    paths.update(step_2=str(run / "exports" / "step_2"), step_4=str(run / "final"))
    res = select_from_run(run, paths["ref"], cfg.select, tmp_path / "chosen", tmp_path / "select.json")
    assert [(s["wins"], s["ties"], s["losses"]) for s in res["scores"]] == [(1, 2, 0), (3, 0, 0)]
    assert res["chosen"] == str(run / "final") and len(stub.bodies) == 2 * 2 * len(PROMPTS)
    assert loaded == ["ref", "step_2", "step_4"] and res["judge_url"] == stub.url
