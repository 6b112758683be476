"""The world's Humpback mode: precision by the checker on hand-written pairs, and the whole mode at tiny
sizes through `recipes.world.demo --method humpback` (a tiny M0 pretrained on the spot)."""
import importlib.util
import json

import pytest

from selfreward.recipes.world import demo
from selfreward.recipes.world.humpback import precision
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
