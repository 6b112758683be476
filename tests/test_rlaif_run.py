"""RLAIF end to end (recipes/rlaif_run.py, a pipeline of label -> rm -> rl): the labels are the labeller's
soft_labels on every pair (the reference: one call over all pairs), the RM trains on exactly those labels and
RL on the prompts against that RM (their run records say so by content), a rerun redoes nothing, a rerun with
another setting is refused, and --reward direct skips the RM and scores with the labeller."""
from __future__ import annotations

import json

import pytest

from selfreward.provenance import file_hash, model_fingerprint
from selfreward.records import DataError, read_jsonl
from recipes_tiny import tiny_chat_model

PAIRS = [("Name a fruit that is red.", "An apple.", "The sky is blue."),
         ("Tell me a joke about dogs.", "Why did the dog sit? It was tired.", "No."),
         ("What is the capital of France?", "Paris.", "I like bread.")]
FAST = ["--engine-device", "cpu", "--rm-max-steps", "2", "--rm-batch-size", "2", "--rm-max-length", "96",
        "--rl-max-steps", "2", "--rl-batch-size", "2", "--rl-max-new-tokens", "4", "--rl-max-length", "96",
        "--chunk", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlaif_run")
    pairs, prompts = d / "pairs.jsonl", d / "prompts.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response_1": a, "response_2": b}) + "\n"
                             for p, a, b in PAIRS * 2))
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _, _ in PAIRS))
    return d, tiny_chat_model(d / "m"), pairs, prompts


def _run(d, m, pairs, prompts, run, *extra):
    from selfreward.recipes.rlaif_run import main
    return main(["--run-dir", str(d / run), "--policy", str(m), "--pairs", str(pairs), "--prompts", str(prompts),
                 *FAST, *extra])


def test_label_rm_rl_end_to_end(world):
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.recipes.rlaif import LabelConfig, soft_labels
    d, m, pairs, prompts = world
    ms = _run(d, m, pairs, prompts, "run")
    run = d / "run"
    labels = read_jsonl(run / "labels.jsonl")
    eng = load_engine(str(m), EngineConfig(device="cpu"))
    ref = soft_labels(eng, eng.tokenizer, PAIRS * 2, LabelConfig())["records"]
    assert [r["id"] for r in labels] == list(range(6))
    for r, w in zip(labels, ref):
        assert r["label"][0] == pytest.approx(w["label"][0], abs=1e-5)
    rm = json.loads((run / "rm" / "run.json").read_text())["made_by"]
    assert rm["data_hashes"] == [file_hash(run / "labels.jsonl")] and rm["model_fingerprint"] == model_fingerprint(m)
    rl = json.loads((run / "rl" / "run.json").read_text())["made_by"]
    assert rl["reward"] == "rm" and rl["reward_model_fingerprint"] == model_fingerprint(run / "rm" / "model")
    assert rl["data_hashes"] == [file_hash(prompts)]
    assert json.loads((run / "rm" / "model" / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
    assert (run / "rl" / "model" / "config.json").exists()
    m0 = ms[0]
    assert set(m0["timings"]) == {"label", "rm", "rl"} and m0["labels"] == 6
    # a rerun redoes nothing (every stage's output is there); another labelling setting is refused
    before = {p: p.stat().st_mtime_ns for p in (run / "labels.jsonl", run / "rm" / "model" / "model.safetensors",
                                                run / "rl" / "model" / "model.safetensors")}
    _run(d, m, pairs, prompts, "run")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(DataError, match=r"made with other settings \(cot: false -> true\)"):
        _run(d, m, pairs, prompts, "run", "--cot")


def test_direct_reward_skips_the_rm(world):
    d, m, pairs, prompts = world
    _run(d, m, pairs, prompts, "direct", "--reward", "direct")
    run = d / "direct"
    assert not (run / "labels.jsonl").exists() and not (run / "rm").exists()
    rl = json.loads((run / "rl" / "run.json").read_text())["made_by"]
    assert rl["reward"] == "direct" and rl["reward_model_fingerprint"] == model_fingerprint(m)
