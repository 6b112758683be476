"""The whole embedded default at tiny sizes: the shipped M0 (and, built apart, a tiny M0: tokenizer and
pretraining), seeds, SFT -> M1, two self-rewarding iterations (prompts, candidates, self-judging, pairs, DPO) -> M2 -> M3, measurement and report. Every stage
runs through the real commands (train/sft.py, train/dpo.py, infer.engine, recipes.self_reward)."""
import json
import time

import torch

from selfreward.model.checkpoint import load_model
from selfreward.recipes.world import demo
from selfreward.recipes.world.build import build_m0
from selfreward.recipes.world.report import pair_quality, table


def test_world_smoke_every_stage(tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    t0 = time.perf_counter()
    summary = demo.main(["--smoke", "--run-dir", str(run), "--cache-dir", str(cache), "--threads", "1"])
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    rows = {r["model"]: r for r in summary["rows"]}
    assert list(rows)[:4] == ["M0", "M1", "M2", "M3"]
    assert set(rows) <= {"M0", "M1", "M2", "M3", "M2-oracle", "M3-oracle", "M3-fixed"}
    assert "M3-fixed" in rows or "[control fixed] iter 2: no pairs" in out
    for r in rows.values():
        for k in ("greedy_acc", "sampled_acc", "pass_at_n", "judge_pairwise"):
            assert 0.0 <= r[k] <= 1.0
        assert r["pass_at_n"] >= r["sampled_acc"] - 1e-9     # any of N right >= the mean of the N
        acc, n = r["greedy_acc"], r["n_eval"]
        assert n == 10 and abs(r["greedy_acc_se"] - (acc * (1 - acc) / n) ** 0.5) < 1e-12
        assert r["judge_judgments"] == 5 * 3 * 2      # 5 groups x 3 replies x K=2
        p, m = r["judge_pairwise"], r["judge_pairs"]
        assert 0 < m <= 5 * 2 and abs(r["judge_pairwise_se"] - (p * (1 - p) / m) ** 0.5) < 1e-12
        assert r["mean_len_tokens"] > 0
    for name in ("M1", "M2"):                          # the iterations each model ran
        r = rows[name]
        # best-rest: a prompt's best against each of its (at most 2) lower-scored texts
        assert r["pairs"] > 0 and r["prompts_paired"] + r["ties"] <= 12
        assert r["prompts_paired"] <= r["pairs"] <= 2 * r["prompts_paired"]
        assert 0 <= r["parse_failures"] <= 12 * 3 * 2
    # judge self-training (the smoke config asks for 8 records) reached each iteration's DPO data
    sc = demo.smoke_config(str(run), str(cache))
    for t in (1, 2):
        it = run / "loop" / f"iter_{t}"
        assert f"[judge self-train] iter {t}: " in out
        assert 1 <= len((it / "judge_self.jsonl").read_text().splitlines()) <= sc.judge_self_train
        made = json.loads((it / "dpo" / "run.json").read_text())["made_by"]   # pairs, EFT mix, judge records
        assert len(made["data_hashes"]) == 2 + (sc.eft_mix > 0)
    # the models are normal HF folders, and DPO changed the weights
    m1, m3 = load_model(run / "m1"), load_model(run / "loop" / "iter_2" / "model")
    assert not torch.equal(m1.tok_embeddings.weight, m3.tok_embeddings.weight)
    for st in ("m0", "sft", "measure", "loop_candidates", "loop_judge", "loop_dpo"):
        assert summary["stage_seconds"][st] >= 0
    assert "acc greedy" in out and "judge pw" in out
    print(f"world smoke: {wall:.1f}s")
    assert "[world] M0: the shipped one" in out                 # --smoke starts from the shipped M0: no build
    # a tiny M0 builds (tokenizer + pretraining) and is cached: asking again returns the same folder untrained
    m0 = build_m0(cache, demo.SMOKE_M0)
    stamp = (m0 / "model.safetensors").stat().st_mtime
    assert load_model(m0).cfg.hidden_size == demo.SMOKE_M0.hidden
    assert build_m0(cache, demo.SMOKE_M0) == m0
    assert (m0 / "model.safetensors").stat().st_mtime == stamp


def test_oracle_judgments_by_checker():
    from selfreward.recipes.pairs import build_pairs
    from selfreward.recipes.world.controls import checker_judgments
    prompts = {"p": "What is 2 plus 3?", "q": "What is 1 plus 1?", "r": "What is 1 plus 2?"}
    cands = [{"id": "p", "sample": 2, "text": "5"}, {"id": "p", "sample": 0, "text": "6"},
             {"id": "p", "sample": 1, "text": "7"}, {"id": "p", "sample": 3, "text": "5"},
             {"id": "q", "sample": 0, "text": "3"}, {"id": "q", "sample": 1, "text": "4"},   # q: all wrong
             {"id": "r", "sample": 0, "text": "3"}, {"id": "r", "sample": 1, "text": "3"}]   # r: one text
    js = checker_judgments(prompts, cands)
    assert {(j["id"], j["sample"]): j["score"] for j in js} == {("p", 0): 1.0, ("p", 1): 1.0, ("p", 2): 5.0,
                                                                 ("q", 0): 1.0, ("q", 1): 1.0}
    # each judgment is the reference one (what judge self-training in the oracle control learns from)
    assert all(j["judgment"].endswith(f"Score: {int(j['score'])}") for j in js)
    pairs, _ = build_pairs([{"id": k, "prompt": v} for k, v in prompts.items()], cands, js)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("p", "5", "6")]


def test_pair_quality_by_checker():
    pairs = [{"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"},
             {"prompt": "What is 2 plus 3?", "chosen": "6", "rejected": "5"},
             {"prompt": "What is 2 plus 3?", "chosen": "7", "rejected": "6"},
             {"prompt": "What is 2 plus 3?", "chosen": "7", "rejected": "7"}]
    q = pair_quality(pairs)
    assert q == {"pair_quality": 1 / 4, "pair_backwards": 1 / 4, "pair_identical": 1 / 4}
    assert pair_quality([]) == {"pair_quality": None, "pair_backwards": None, "pair_identical": None}
    text = table([{"model": "M1", "greedy_acc": 0.5, "pairs": 3}])
    assert "M1" in text and "0.500" in text and text.count("\n") == 2
