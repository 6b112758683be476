"""RLAIF labels and direct scores (recipes/rlaif.py) against hand computations from a plain forward's
logits; the both-orders average against a labeller that only sees positions; the prefix cache's counters."""
from __future__ import annotations

import math

import pytest
import torch

from selfreward.records import DataError
from recipes_tiny import tiny_chat_model

ITEMS = [("Name a fruit that is red.", "An apple.", "The sky is blue."),
         ("Tell me a joke about dogs.", "Why did the dog sit? It was tired.", "No."),
         ("What is the capital of France?", "Paris.", "I like bread.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.model.checkpoint import load_model
    from selfreward.model.tokenizer import Tokenizer
    d = tiny_chat_model(tmp_path_factory.mktemp("rlaif") / "m")
    return load_engine(str(d), EngineConfig(device="cpu")), Tokenizer.load(d), load_model(d)


def _last_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.forward_batch(torch.tensor([ids]))[0, -1].double(), -1)   # [V]


def _hand_label_prompt(tok, t, ctx, a, b, text):
    """The prompt written out by hand: system = preamble, user = the sample, assistant begins with `text`."""
    user = getattr(t, "exemplars", "") + t.sample.replace("{context}", ctx).replace("{response_1}", a).replace("{response_2}", b)
    chat, _ = tok.render_chat([{"role": "system", "content": t.preamble}, {"role": "user", "content": user}],
                              add_generation_prompt=True)
    one, two = tok.encode(text + " 1"), tok.encode(text + " 2")
    assert one[:-1] == two[:-1] and one[-1] != two[-1]     # "1" and "2" are one token each here
    return chat + one[:-1], one[-1], two[-1]


def test_label_equals_hand_computation_in_both_orders(tiny):
    from selfreward.recipes.rlaif import LabelTemplate, soft_labels
    engine, tok, model = tiny
    t = LabelTemplate()
    res = soft_labels(engine, tok, ITEMS)
    for (ctx, a, b), rec in zip(ITEMS, res["records"]):
        want = []
        for x, y in ((a, b), (b, a)):
            ids, i1, i2 = _hand_label_prompt(tok, t, ctx, x, y, t.ending)
            lp = _last_logprobs(model, ids)
            want.append(math.exp(lp[i1]) / (math.exp(lp[i1]) + math.exp(lp[i2])))   # P("1") over {1, 2}
        assert rec["p_first"] == pytest.approx(want[0], abs=1e-5)
        assert rec["p_first_swapped"] == pytest.approx(want[1], abs=1e-5)
        assert rec["label"][0] == pytest.approx((want[0] + 1 - want[1]) / 2, abs=1e-5)
        assert rec["label"][1] == pytest.approx((want[1] + 1 - want[0]) / 2, abs=1e-5)   # response 2's side
    assert len({round(r["p_first"], 6) for r in res["records"]}) > 1     # the labels depend on the pair


def test_few_shot_exemplars_sit_between_the_preamble_and_the_sample(tiny, tmp_path):
    """The paper's prompt: preamble + exemplars + sample + ending; the exemplars open the user turn."""
    from selfreward.recipes.rlaif import LabelConfig, LabelTemplate, read_template, soft_labels
    engine, tok, model = tiny
    f = tmp_path / "t.json"
    f.write_text('{"exemplars": "Example. Conversation: Say hi. Response 1: Hi! Response 2: No. Preferred: 1\\n\\n"}')
    t = read_template(LabelTemplate, f)
    assert t.exemplars.startswith("Example.") and t.sample == LabelTemplate().sample
    ctx, a, b = ITEMS[0]
    rec = soft_labels(engine, tok, [ITEMS[0]], LabelConfig(template=t))["records"][0]
    ids, i1, i2 = _hand_label_prompt(tok, t, ctx, a, b, t.ending)
    assert tok.decode(ids).count("Example.") == 1
    lp = _last_logprobs(model, ids)
    assert rec["p_first"] == pytest.approx(math.exp(lp[i1]) / (math.exp(lp[i1]) + math.exp(lp[i2])), abs=1e-5)
    plain = soft_labels(engine, tok, [ITEMS[0]])["records"][0]
    assert abs(rec["p_first"] - plain["p_first"]) > 1e-6          # the exemplars reach the labeller


def test_chain_of_thought_label_is_read_after_the_rationale(tiny):
    from selfreward.recipes.rlaif import LabelConfig, LabelTemplate, soft_labels
    engine, tok, model = tiny
    t = LabelTemplate()
    res = soft_labels(engine, tok, ITEMS[:2], LabelConfig(cot=True, cot_max_tokens=12))
    for (ctx, a, b), rec in zip(ITEMS[:2], res["records"]):
        r = rec["rationales"][0]
        text = f"{r} {t.ending}" if r else t.ending
        ids, i1, i2 = _hand_label_prompt(tok, replace_sample(t), ctx, a, b, text)
        lp = _last_logprobs(model, ids)
        assert rec["p_first"] == pytest.approx(math.exp(lp[i1]) / (math.exp(lp[i1]) + math.exp(lp[i2])), abs=1e-5)


def _greedy(model, tok, ids: list[int], n: int) -> str:
    """n greedy tokens after ids from a plain forward (stops at EOS), decoded."""
    out = []
    for _ in range(n):
        nxt = int(_last_logprobs(model, ids + out).argmax())
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
    return tok.decode(out)


def test_checked_label_is_read_after_each_reply_checked_alone(tiny):
    """--checks: each reply is checked in a chat of its own (the check template, no system turn, greedy),
    the rationale names the checks by each order's numbering, and the label is read after it."""
    from selfreward.recipes.rlaif import LabelConfig, LabelTemplate, soft_labels
    engine, tok, model = tiny
    t = LabelTemplate()
    res = soft_labels(engine, tok, ITEMS[:2], LabelConfig(cot=True, checks=True, cot_max_tokens=6))
    for (ctx, a, b), rec in zip(ITEMS[:2], res["records"]):
        checks = {}
        for r in (a, b):
            chat, _ = tok.render_chat([{"role": "user", "content": t.check.replace("{context}", ctx)
                                       .replace("{response}", r)}], add_generation_prompt=True)
            checks[r] = _greedy(model, tok, chat, 6).strip()
        for (x, y), p, rationale in (((a, b), rec["p_first"], rec["rationales"][0]),
                                     ((b, a), rec["p_first_swapped"], rec["rationales"][1])):
            want = t.check_rationale.replace("{check_1}", checks[x]).replace("{check_2}", checks[y]).strip()
            assert rationale == want
            ids, i1, i2 = _hand_label_prompt(tok, replace_sample(t), ctx, x, y, f"{want} {t.ending}")
            lp = _last_logprobs(model, ids)
            assert p == pytest.approx(math.exp(lp[i1]) / (math.exp(lp[i1]) + math.exp(lp[i2])), abs=1e-5)
    assert any(c for rec in res["records"] for c in rec["rationales"])
    plain = soft_labels(engine, tok, ITEMS[:2], LabelConfig(cot=True, cot_max_tokens=6))["records"]
    assert [r["rationales"] for r in plain] != [r["rationales"] for r in res["records"]]


def test_checks_need_their_slots(tmp_path):
    from selfreward.recipes.prompts import TemplateError
    from selfreward.recipes.rlaif import LabelTemplate, read_template
    f = tmp_path / "t.json"
    f.write_text('{"check_rationale": "First: {check_1}"}')
    with pytest.raises(TemplateError, match="check_rationale.*check_2"):
        read_template(LabelTemplate, f)


def replace_sample(t):
    from dataclasses import replace
    return replace(t, sample=t.sample + t.cot_request)


class FirstPositionLabeller:
    """A fake engine that gives the first shown response P = 0.9, whatever it is."""
    max_len = 4096
    stats = {"prefill_computed": 0, "prefix_hit": 0}

    def next_token_logprobs(self, prompts, cands):
        return torch.log(torch.tensor([[0.9, 0.1]] * len(prompts)))


def test_both_orders_cancel_a_position_labeller(tiny):
    from selfreward.recipes.rlaif import position_bias, soft_labels
    _, tok, _ = tiny
    res = soft_labels(FirstPositionLabeller(), tok, ITEMS)
    for r in res["records"]:
        assert r["p_first"] == pytest.approx(0.9) and r["p_first_swapped"] == pytest.approx(0.9)
        assert r["label"] == pytest.approx([0.5, 0.5])
    b = position_bias(res["records"])
    assert b["one_order"] == 1.0 and b["both_orders"] == 0.5 and b["order_consistent"] == 0.0


def test_shared_preamble_hits_the_prefix_cache(tiny):
    from selfreward.infer.engine import Engine
    from selfreward.recipes.rlaif import soft_labels
    engine, tok, model = tiny
    cold = Engine(model, tok, prefix_cache=False)
    a, b = soft_labels(Engine(model, tok), tok, ITEMS), soft_labels(cold, tok, ITEMS)
    assert a["prefill"]["prefix_hit"] > 0 and a["prefill"]["saved"] > 0.2
    assert b["prefill"]["prefix_hit"] == 0
    assert a["prefill"]["prefix_hit"] + a["prefill"]["prefill_computed"] == b["prefill"]["prefill_computed"]
    for x, y in zip(a["records"], b["records"]):
        assert x["label"][0] == pytest.approx(y["label"][0], abs=1e-5)


@pytest.fixture(scope="module")
def world_tiny(tmp_path_factory):
    """A random tiny model with the world's tokenizer, which splits "10" into "1" + "0"."""
    import shutil
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.model.checkpoint import load_model
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.world.vocab import train_tokenizer
    from hf_tiny import make_hf_checkpoint
    root = tmp_path_factory.mktemp("world_tok")
    tok_dir = train_tokenizer(root / "tok")
    d = make_hf_checkpoint(root / "m", "llama_tied", vocab=160, hidden=32, layers=2, heads=2, kv_heads=1,
                           intermediate=64)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return load_engine(str(d), EngineConfig(device="cpu")), Tokenizer.load(d), load_model(d)


@pytest.mark.parametrize("which,ten_tokens", [("tiny", 1), ("world_tiny", 2)])
def test_direct_score_equals_hand_computation(which, ten_tokens, request):
    from selfreward.recipes.rlaif import ScoreTemplate, direct_scores
    engine, tok, model = request.getfixturevalue(which)
    t = ScoreTemplate()
    items = [(c, a) for c, a, _ in ITEMS]
    res = direct_scores(engine, tok, items)
    encs = [tok.encode(f"{t.ending} {i}") for i in range(1, 11)]
    n = len(tok.encode(t.ending))                    # "Score:" is whole in both tokenizers (asserted below)
    head, tails = encs[0][:n], [e[n:] for e in encs]
    assert all(e[:n] == head for e in encs) and len(tails[9]) == ten_tokens
    assert res["tokens_per_option"] == [len(x) for x in tails]
    if ten_tokens == 2:
        assert tails[9][0] == tails[0][0] and len(tails[0]) == 1      # "10" = "1" + "0": the prefix rule is hit
    for (ctx, r), rec in zip(items, res["records"]):
        user = getattr(t, "exemplars", "") + t.sample.replace("{context}", ctx).replace("{response}", r)
        chat, _ = tok.render_chat([{"role": "system", "content": t.preamble}, {"role": "user", "content": user}],
                                  add_generation_prompt=True)
        ids = chat + head
        full = []                                   # P(option's whole token sequence), by successive forwards
        for tail in tails:
            lp = sum(float(_last_logprobs(model, ids + tail[:j])[tail[j]]) for j in range(len(tail)))
            full.append(math.exp(lp))
        p = list(full)
        if ten_tokens == 2:
            p[0] = full[0] - full[9]                # "1" not continued by "0"
        z = sum(p)
        e = sum((i + 1) * q / z for i, q in enumerate(p))
        assert rec["expected"] == pytest.approx(e, abs=1e-5)
        assert rec["reward"] == pytest.approx((e - 5.5) / 4.5, abs=1e-5)
        assert -1 <= rec["reward"] <= 1


def test_label_cli_bad_input_names_the_line(tmp_path):
    import os
    import subprocess
    import sys
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "response_1": "b", "response_2": "c"}\n{"prompt": "a", "response_1": "b"}\n')
    r = subprocess.run([sys.executable, "-m", "selfreward.recipes.rlaif", "label", "--labeller", str(tmp_path),
                        "--pairs", str(bad), "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: " in r.stderr and "pairs.jsonl:2: missing field 'response_2'" in r.stderr
    t = tmp_path / "t.json"
    t.write_text('{"sample": "no slots"}')
    r = subprocess.run([sys.executable, "-m", "selfreward.recipes.rlaif", "label", "--labeller", str(tmp_path),
                        "--pairs", str(bad), "--template", str(t), "--out", str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "t.json: field 'sample' lacks placeholder {context}" in r.stderr


# ---- the label CLI: the house's output rules (lock, record, resume) and the engine from flags ----------

def _pairs_file(path, n=7):
    import json
    rows = [{"prompt": f"Question {i}: {ITEMS[i % 3][0]}", "response_1": ITEMS[i % 3][1] * (1 + i % 2),
             "response_2": ITEMS[i % 3][2]} for i in range(n)]
    rows[2]["id"] = "two"                       # an id given is kept; the others get their place in the file
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="module")
def label_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlaif_cli")
    return d, tiny_chat_model(d / "m"), _pairs_file(d / "pairs.jsonl")


def _label(d, m, pairs, out, *extra):
    from selfreward.recipes import rlaif
    return rlaif.main(["label", "--labeller", str(m), "--pairs", str(pairs), "--out", str(out), "--chunk", "3",
                       *map(str, extra)])


@pytest.mark.parametrize("flag", ["--cot", "--checks"])
def test_label_cli_equals_one_call_over_every_pair(label_world, tiny, flag):
    """Chunks of 3 label what one call over every pair does, with a sampled rationale or with checks."""
    from selfreward.recipes.rlaif import LabelConfig, soft_labels
    from selfreward.records import read_jsonl
    d, m, (pairs, rows) = label_world
    out = d / f"all{flag}.jsonl"
    s = _label(d, m, pairs, out, flag, "--cot-max-tokens", "6")
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [0, 1, "two", 3, 4, 5, 6]
    assert [{k: r[k] for k in ("prompt", "response_1", "response_2")} for r in got] == \
        [{k: r[k] for k in ("prompt", "response_1", "response_2")} for r in rows]
    # the reference: soft_labels over all pairs at once, on an engine of its own (the CLI ran in chunks of 3)
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.model.tokenizer import Tokenizer
    ref = soft_labels(load_engine(str(m), EngineConfig(device="cpu")), Tokenizer.load(m),
                      [(r["prompt"], r["response_1"], r["response_2"]) for r in rows],
                      LabelConfig(cot=True, checks=flag == "--checks", cot_max_tokens=6))["records"]
    for r, w in zip(got, ref):
        assert r["label"][0] == pytest.approx(w["label"][0], abs=1e-5)
        assert r["p_first_swapped"] == pytest.approx(w["p_first_swapped"], abs=1e-5)
        assert r["rationales"] == w["rationales"]
    assert s["pairs"] == 7 and s["labelled_by_this_run"] == 7 and s["dtype"] == "float32"


def test_label_cli_resumes_after_a_failed_write_and_refuses_a_mismatch(label_world, monkeypatch):
    import json
    from selfreward import records
    from selfreward.records import read_jsonl
    from guarantee_fixtures import disk_full_at
    d, m, (pairs, _) = label_world
    straight, cut = d / "straight.jsonl", d / "cut.jsonl"
    _label(d, m, pairs, straight)
    with disk_full_at(monkeypatch, 4), pytest.raises(OSError):   # one append per pair: chunk 2's first
        _label(d, m, pairs, cut)
    assert not cut.exists() and len(records.read_partial(cut)) == 3     # the first chunk of 3 pairs kept
    s = _label(d, m, pairs, cut)
    assert s["labelled_by_this_run"] == 4                                # only the pairs not yet labelled
    a, b = read_jsonl(cut), read_jsonl(straight)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(x["label"][0] == pytest.approx(y["label"][0], abs=1e-5) for x, y in zip(a, b))
    assert json.loads((d / "cut.jsonl.summary.json").read_text())["pairs"] == 7
    # another setting or labeller: refused (exit 2 through run_main), the output left as it was
    before = cut.read_bytes()
    with pytest.raises(DataError, match=r"settings.seed: 0 -> 1"):
        _label(d, m, pairs, cut, "--seed", "1")
    with pytest.raises(DataError, match=r"settings.checks: false -> true"):
        _label(d, m, pairs, cut, "--checks")
    other = tiny_chat_model(d / "m2", seed=1)
    with pytest.raises(DataError, match="labeller_fingerprint"):
        _label(d, other, pairs, cut)
    assert cut.read_bytes() == before
    s = _label(d, other, pairs, cut, "--overwrite")
    assert s["labelled_by_this_run"] == 7 and cut.read_bytes() != before


def test_label_cli_second_writer_is_refused_and_leaves_the_files(label_world):
    from selfreward.provenance import output_lock
    d, m, (pairs, _) = label_world
    out = d / "locked.jsonl"
    with output_lock(out):
        out.with_name("locked.jsonl.partial").write_bytes(b"")
        with pytest.raises(DataError, match="another run"):
            _label(d, m, pairs, out)
        assert out.with_name("locked.jsonl.partial").exists() and not out.exists()


def test_label_cli_engine_flags_reach_the_engine(label_world, monkeypatch):
    import torch
    from selfreward.infer import config
    d, m, (pairs, _) = label_world
    seen, real = [], config.load_engine

    def spy(path, cfg=None):
        seen.append(cfg)
        eng = real(path, cfg)
        seen.append(eng)
        return eng
    monkeypatch.setattr(config, "load_engine", spy)
    s = _label(d, m, pairs, d / "bf16.jsonl", "--engine-device", "cpu", "--engine-dtype", "bfloat16",
               "--engine-max-num-seqs", "5")
    cfg, eng = seen
    assert (cfg.device, cfg.dtype, cfg.max_num_seqs) == ("cpu", "bfloat16", 5)
    assert eng.runner.dtype == torch.bfloat16 and s["dtype"] == "bfloat16"
    seen.clear()
    _label(d, m, pairs, d / "auto.jsonl")
    assert seen[0].device == "" and seen[0].dtype == ""    # the default: CUDA + bf16 where there is one


def test_label_cli_bad_flags_and_ids(label_world, tmp_path):
    from selfreward.cli import ConfigError
    d, m, (pairs, _) = label_world
    with pytest.raises(ConfigError, match="--chunk 0: must be >= 1"):
        _label(d, m, pairs, tmp_path / "x.jsonl", "--chunk", "0")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a", "response_1": "b", "response_2": "c"}\n'
                   '{"prompt": "a", "response_1": "b", "response_2": "c"}\n')   # gets id 1: a clash
    with pytest.raises(DataError, match=r"dup.jsonl:2: field 'id': duplicate 1 \(first on line 1\)"):
        _label(d, m, dup, tmp_path / "x.jsonl")
    assert not list(tmp_path.glob("x.jsonl*"))
