"""The world's Humpback mode: precision by the checker on hand-written pairs, and the whole mode at tiny
sizes through `recipes.world.demo --method humpback` (a tiny M0 pretrained on the spot)."""
import importlib.util
import json

import pytest

from selfreward.recipes.world import demo
from selfreward.recipes.world.humpback import (WorldHumpbackConfig, by_kind, humpback_config, paired_se,
                                               precision, unlabelled_answers, world_kinds, write_thin_seeds)
from selfreward.recipes.world.checker import check
from selfreward.records import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_precision_and_recall_by_the_checker():
    cands = [{"id": "a", "instruction": "Reverse: a b c d e", "output": "e d c b a"},             # right
             {"id": "b", "instruction": "Which is largest: 1, 2, 3, 4, 5?", "output": "4"},       # wrong
             {"id": "c", "instruction": "Say hello.", "output": "hello"},                          # not a task
             {"id": "d", "instruction": "Find the minimum of 7, 3, 9, 4, 8.", "output": "3"}]     # right
    assert precision(cands) == (2 / 4, 1.0)
    assert precision(cands, {"a", "b"}) == (1 / 2, 1 / 2)
    assert precision(cands, {"a", "d"}) == (1.0, 1.0)
    assert precision(cands, set()) == (None, 0.0)


def test_thin_seeds_and_a_pool_rich_in_the_thin_kind(tmp_path):
    from selfreward import cli
    from selfreward.recipes.world.build import write_seeds
    cfg = WorldHumpbackConfig(kinds="sort,reverse", thin_kinds="reverse", thin_n_ift=5, thin_n_eft=3, n_ift=30,
                              n_eft=20, pool_kinds="reverse,reverse,sort")
    kinds, thin, pool = world_kinds(cfg)
    assert (kinds, thin, pool) == (("sort", "reverse"), ("reverse",), ("reverse", "reverse", "sort"))
    write_thin_seeds(tmp_path, cfg, kinds, thin)
    ift, eft = read_jsonl(tmp_path / "seed" / "ift.jsonl"), read_jsonl(tmp_path / "seed" / "eft.jsonl")
    assert len(ift) == 30 and sum(r["kind"] == "reverse" for r in ift) == 5
    assert len(eft) == 20 and sum(r["kind"] == "reverse" for r in eft) == 3
    assert {r["kind"] for r in ift + eft} == {"sort", "reverse"}
    assert all(check(r["prompt"], r["response"]) == 1.0 for r in ift)
    u = unlabelled_answers(300, 0, pool)
    assert 170 < sum(r["kind"] == "reverse" for r in u) < 230 and {r["kind"] for r in u} == {"sort", "reverse"}
    # no thin kind: build.write_seeds' very files, of the run's kinds (default: M0's)
    plain = WorldHumpbackConfig(n_ift=12, n_eft=9)
    write_thin_seeds(tmp_path / "a", plain, *world_kinds(plain)[:2])
    write_seeds(tmp_path / "b", 12, 9, 0, plain.m0)
    for f in ("ift.jsonl", "eft.jsonl"):
        assert (tmp_path / "a" / "seed" / f).read_bytes() == (tmp_path / "b" / "seed" / f).read_bytes()
    for bad, msg in (({"thin_kinds": "max"}, "max is not one of the run's kinds"),
                     ({"pool_kinds": "add"}, "add is not one of the run's kinds"),
                     ({"thin_kinds": "sort,reverse"}, "leaves no other kind"),
                     ({"thin_n_ift": 16, "thin_kinds": "reverse,sort", "kinds": "sort,reverse,max"},
                      "more thin examples"),
                     ({"kinds": "sort,foo"}, "unknown task kinds")):
        with pytest.raises(cli.ConfigError, match=msg):
            world_kinds(WorldHumpbackConfig(**{"kinds": "sort,reverse", "n_ift": 30, **bad}))


def test_precision_by_kind_and_paired_se(tmp_path):
    from selfreward.records import write_jsonl
    hc = humpback_config(WorldHumpbackConfig(run_dir=str(tmp_path)), tmp_path / "m0", tmp_path / "seed", 1)
    unl = [{"text": "e d c b a", "kind": "reverse"}, {"text": "3", "kind": "max"}, {"text": "3", "kind": "min"},
           {"text": "0 1 2", "kind": "sort"}]
    cands = [{"id": "a", "instruction": "Reverse: a b c d e", "output": "e d c b a"},          # right
             {"id": "b", "instruction": "Which is largest: 1, 2, 3?", "output": "3"},           # right
             {"id": "c", "instruction": "Sort these digits: 2 1 1", "output": "0 1 2"},         # wrong
             {"id": "d", "instruction": "Say hello.", "output": "hello"}]                       # not in the pool
    write_jsonl(tmp_path / "hb" / "iter_1" / "A4.jsonl", [{"id": "a"}, {"id": "c"}])
    write_jsonl(tmp_path / "hb" / "iter_1" / "A5.jsonl", [{"id": "c"}])
    k = by_kind(cands, unl, hc, 1)
    assert set(k) == {"reverse", "max/min", "sort", "?"}
    assert k["reverse"] == {"candidates": 1, "right": 1, "precision_all": 1.0, "size_a4": [1], "precision_a4": [1.0],
                            "recall_a4": [1.0], "size_a5": [0], "precision_a5": [None], "recall_a5": [0.0]}
    assert k["sort"]["precision_all"] == 0.0 and k["sort"]["size_a5"] == [1] and k["sort"]["recall_a5"] == [None]
    assert k["max/min"]["right"] == 1 and k["max/min"]["size_a4"] == [0]
    assert paired_se("1100", "1000") == pytest.approx(0.25)
    assert paired_se("1010", "1010") == 0.0


def test_world_humpback_every_stage(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    m0 = ["--m0-hidden", "32", "--m0-layers", "2", "--m0-heads", "2", "--m0-ffn", "64", "--m0-web-docs", "2000",
          "--m0-base-steps", "0", "--m0-pretrain-steps", "60", "--m0-pretrain-batch", "16", "--m0-pretrain-lr", "0.01"]
    s = demo.main(["--method", "humpback", "--run-dir", str(run), "--cache-dir", str(cache), "--n-ift", "24",
                   "--n-eft", "24", "--n-unlabelled", "30", "--sft-steps", "4", "--sft-batch", "8", "--n-eval", "8",
                   "--n-judge", "2", "--curate-k", "2", "--threads", "1", *m0])
    assert json.loads((run / "summary.json").read_text())["rows"] == json.loads(json.dumps(s["rows"]))
    names = [(r["model"], r["iteration"]) for r in s["rows"]]
    assert names == [("seed", 0), ("seed+uncurated", 0), ("seed+A4", 1), ("seed+A5", 1), ("seed+A4", 2),
                     ("seed+A5", 2)]
    assert all(0 <= r["greedy_acc"] <= 1 for r in s["rows"])
    # the reported precision, recomputed from the files with the checker
    cands = read_jsonl(run / "hb" / "candidates.jsonl")
    right = {c["id"] for c in cands if check(c["instruction"], c["output"]) == 1.0}
    assert s["precision_all"] == len(right) / len(cands) and s["candidates"] == len(cands)
    for t in (1, 2):
        for k in (4, 5):
            kept = {r["id"] for r in read_jsonl(run / "hb" / f"iter_{t}" / f"A{k}.jsonl")}
            assert s[f"size_a{k}"][t - 1] == len(kept)
            assert s[f"precision_a{k}"][t - 1] == (len(kept & right) / len(kept) if kept else None)
        assert set(read_jsonl(run / "hb" / f"iter_{t}" / "A5.jsonl")[i]["id"] for i in range(s["size_a5"][t - 1])) <= \
            {r["id"] for r in read_jsonl(run / "hb" / f"iter_{t}" / "A4.jsonl")}
    assert (run / "hb" / "iter_2" / "model" / "config.json").exists()
    # the plot is optional (the `plot` extra): drawn when matplotlib imports, else none and summary says so
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (run / "curves.png").exists() == has_mpl and (s["plot"] is not None) == has_mpl
    # a rerun with another setting is refused before it rewrites the seeds or reuses a stage
    from selfreward.records import DataError
    before = {p: p.read_bytes() for p in (run / "seed").iterdir()}
    with pytest.raises(DataError, match=r"humpback_settings.json.*n_unlabelled: 30 -> 31"):
        demo.main(["--method", "humpback", "--run-dir", str(run), "--cache-dir", str(cache), "--n-ift", "24",
                   "--n-eft", "24", "--n-unlabelled", "31", "--sft-steps", "4", "--sft-batch", "8", "--n-eval", "8",
                   "--n-judge", "2", "--curate-k", "2", "--threads", "1", *m0])
    assert {p: p.read_bytes() for p in (run / "seed").iterdir()} == before
