"""A whole M1 -> M3 self-rewarding run on a tiny random model, through the real engine and DPO trainer;
then the same command again, which finds every stage done and recomputes nothing."""
import json

import pytest
from safetensors.torch import load_file

from selfreward.records import read_jsonl
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import run_loop
from recipes_tiny import SEEDS, loop_config, tiny_chat_model, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loop_m1_to_m3_and_rerun(tmp_path):
    m1 = tiny_chat_model(tmp_path / "m1")
    seeds = write_prompts(tmp_path / "seeds.jsonl", SEEDS)
    hooked = []

    def hook(t, model_dir):
        hooked.append((t, model_dir))
        return {"bytes": sum(len(v.numpy().tobytes()) for v in load_file(f"{model_dir}/model.safetensors").values())}

    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(m1), iterations=2, seed_prompts=str(seeds),
                      n_prompts=3, prompt_max_tokens=16, prompt_min_words=1, n_candidates=2, max_tokens=8,
                      judge_k=1, judge_max_tokens=8, judge_template="short", score_from="expected", chunk=4,
                      dpo=dict(max_steps=1, batch_size=2, max_length=128, lr=1e-3, warmup_steps=0), eval_hook=hook)
    ms = run_loop(cfg)
    assert [t for t, _ in hooked] == [1, 2, 3]
    weights = [load_file(f"{d}/model.safetensors") for _, d in hooked]
    for a, b in zip(weights, weights[1:]):   # each DPO step moved the weights
        assert any((a[k] != b[k]).any() for k in a)
    for t, m in enumerate(ms, 1):
        it = folder(cfg, t)
        c = m["counts"]
        assert c["prompts"] == 3 and c["candidates"] == 6 and c["judgments"] == 6
        assert c["pairs"] + c["ties"] + c["prompts_too_few_scored"] == 3 and c["pairs"] >= 1
        assert len(read_jsonl(it / "pairs.jsonl")) == c["pairs"]
        assert (it / "model" / "config.json").exists() and (it / "dpo" / "metrics.jsonl").exists()
        assert set(m["timings"]) == {"prompts", "candidates", "judge", "pairs", "dpo"}
        assert m["mean_len"]["candidate_tokens"] <= 8 and "expected_score_mean" in m
        assert sum(m["expected_score_histogram"].values()) == 6   # one expected score per candidate
    assert ms[0]["eval"].keys() == {"M1"} and ms[1]["eval"].keys() == {"M2", "M3"}
    gen2 = [r for r in read_jsonl(folder(cfg, 2) / "prompts.jsonl") if r["verdict"] == "ok"]
    assert len(gen2) == 3 and all(r["source"] == "generated" for r in gen2)
    # the same command again: every stage is skipped, nothing is rewritten, the hook is not called again
    files = sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file() and "manifest" not in p.name)
    stamp = {p: p.stat().st_mtime_ns for p in files}
    ms2 = run_loop(cfg)
    assert {p: p.stat().st_mtime_ns for p in files} == stamp and len(hooked) == 3
    assert [m["counts"] for m in ms2] == [m["counts"] for m in ms]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iterations"] == 2


def test_loop_from_m0_on_oasst_seed(stories260k, tmp_path, one_thread):
    """The loop on a real checkpoint with OASST seed data: SFT of M0 on the OASST
    seed -> M1, one self-rewarding iteration (self-instruct prompts, candidates, judge, pairs from the expected
    score, DPO), the judge's agreement with the human ranks on M1 and M2."""
    from conftest import need_shared
    from selfreward.recipes.oasst import main as oasst_main
    from selfreward.recipes.self_reward import main as loop_main
    seed = tmp_path / "seed"
    oasst_main(["--input", str(need_shared("data/oasst_en_100_trees.jsonl")), "--out", str(seed)])
    run = tmp_path / "real"
    manifests = loop_main(["--base-model", str(stories260k), "--sft-data", str(seed / "ift.jsonl"),
                           "--seed-prompts", str(seed / "ift.jsonl"), "--eval-groups", str(seed / "groups_eval.jsonl"),
                           "--run-dir", str(run), "--iterations", "1", "--n-prompts", "4", "--candidates-n", "2",
                           "--judge-k", "1", "--judge-template", "short", "--candidates-max-tokens", "16",
                           "--judge-max-tokens", "16", "--score-from", "expected", "--dpo-lr", "1e-5",
                           "--sft-max-steps", "4", "--eval-limit", "3"])
    head, m = manifests
    assert head["model_in"] == str(stories260k) and head["model_out"] == str(run / "m1")
    assert m["counts"]["pairs"] >= 1 and set(m["eval"]) == {"M1", "M2"}
    replies = sum(len(json.loads(x)["replies"]) for x in (seed / "groups_eval.jsonl").read_text().splitlines()[:3])
    for ev in m["eval"].values():      # stories260k rarely writes a score: the metrics may be None, never missing
        assert set(ev) == {"judge_pairwise", "judge_five_best", "judge_exact_match", "judge_spearman",
                           "judge_kendall_tau", "judge_parse_failures"}
        assert 0 <= ev["judge_parse_failures"] <= replies
    assert (run / "m1" / "config.json").exists() and (run / "iter_1" / "model" / "config.json").exists()
