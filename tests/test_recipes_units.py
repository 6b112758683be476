"""Resumable JSONL, unit runner (injected failure + resume), pairs, self-instruct filters."""
import json
from collections import Counter

import pytest

from selfreward.recipes.instruct import InstructConfig, PromptFilter, cut_generated, few_shot_text, pick_shots
from selfreward.records import DataError, PartialWriter, partial_path, read_jsonl, read_partial
from selfreward.recipes.pairs import build_pairs, iteration_stats
from selfreward.units import run_units


def test_partial_torn_tail_is_cut(tmp_path):
    out = tmp_path / "x.jsonl"
    with PartialWriter(out) as w:
        w.write([{"a": 1}, {"a": 2}])
    p = partial_path(out)
    p.write_text(p.read_text() + '{"a": 3, "b')   # a kill mid-write
    assert read_partial(out) == [{"a": 1}, {"a": 2}]
    assert p.read_text().endswith('{"a": 2}\n')
    with PartialWriter(out) as w:
        assert w.records == [{"a": 1}, {"a": 2}]
        w.write([{"a": 3}])
        w.finish()
    assert read_jsonl(out) == [{"a": 1}, {"a": 2}, {"a": 3}] and not p.exists()
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DataError, match="bad JSON"):
        read_partial(out)


def _work_factory(calls, fail_after=None, per_unit=3):
    def work(batch, emit):
        for i, u in batch:
            calls.append(u["id"])
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("injected")
            emit(i, [{"id": u["id"], "k": k, "v": i * 10 + k} for k in range(per_unit)])
    return work


def test_run_units_resume_after_injected_failure(tmp_path):
    units = [{"id": f"u{i}"} for i in range(10)]
    key = lambda r: r["id"]  # noqa: E731
    ref = tmp_path / "ref.jsonl"
    run_units(ref, units, 3, key, _work_factory([]), chunk=3)
    out = tmp_path / "out.jsonl"
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_units(out, units, 3, key, _work_factory(calls, fail_after=7), chunk=3)
    assert not out.exists() and len(read_partial(out)) == 7 * 3
    # a torn unit: only 2 of u7's 3 records made it to disk (plus half a line)
    p = partial_path(out)
    p.write_text(p.read_text() + json.dumps({"id": "u7", "k": 0, "v": 70}) + "\n" +
                 json.dumps({"id": "u7", "k": 1, "v": 71}) + "\n" + '{"id": "u7", "k"')
    calls2 = []
    run_units(out, units, 3, key, _work_factory(calls2), chunk=3)
    assert calls2 == ["u7", "u8", "u9"]          # only the unfinished units are redone
    assert read_jsonl(out) == read_jsonl(ref)     # nothing lost, nothing duplicated, same order
    run_units(out, units, 3, key, _work_factory(calls3 := []), chunk=3)   # finished: skipped
    assert calls3 == []


def test_run_units_refuses_a_finished_file_of_other_units(tmp_path):
    """A finished OUT is reused as it is only when it holds exactly this run's units (an adopted file of another
    input, one short of a unit, or one whose records lack the key field is an error, not a KeyError or a
    silently partial result); the file is left as it was."""
    key = lambda r: r["id"]  # noqa: E731
    out = tmp_path / "out.jsonl"
    run_units(out, [{"id": f"u{i}"} for i in range(4)], 3, key, _work_factory([]), chunk=2)
    before = out.read_bytes()
    cases = [([{"id": f"u{i}"} for i in range(5)], "4 of this run's 5 units"),          # a unit missing
             ([{"id": f"v{i}"} for i in range(4)], "unit 'u0' is not one of this run's"),
             ([{"id": f"u{i}"} for i in range(4)], None)]                              # the same: reused
    for units, needle in cases:
        if needle is None:
            run_units(out, units, 3, key, _work_factory(calls := []), chunk=2)
            assert calls == []
        else:
            with pytest.raises(DataError, match=needle):
                run_units(out, units, 3, key, _work_factory([]), chunk=2)
        assert out.read_bytes() == before
    old = tmp_path / "old.jsonl"                          # an earlier version's file: no unit key at all
    old.write_text("".join(json.dumps({"v": i}) + "\n" for i in range(12)))
    with pytest.raises(DataError, match="old.jsonl: holds other work"):
        run_units(old, [{"id": f"u{i}"} for i in range(4)], 3, key, _work_factory([]), chunk=2)


def test_run_units_sharded_merge_equals_single(tmp_path, monkeypatch):
    import selfreward.units as units_mod
    monkeypatch.setattr(units_mod, "barrier", lambda: None)   # the ranks run one after the other here
    units = [{"id": f"u{i}"} for i in range(7)]
    key = lambda r: r["id"]  # noqa: E731
    run_units(tmp_path / "one.jsonl", units, 2, key, _work_factory([], per_unit=2))
    assert run_units(tmp_path / "two.jsonl", units, 2, key, _work_factory([], per_unit=2), rank=1, world=2) is False
    assert run_units(tmp_path / "two.jsonl", units, 2, key, _work_factory([], per_unit=2), rank=0, world=2) is True
    assert read_jsonl(tmp_path / "two.jsonl") == read_jsonl(tmp_path / "one.jsonl")
    assert not list(tmp_path.glob("two.jsonl.rank*"))


def test_build_pairs_ties_unparsable_and_stats():
    prompts = [{"id": "a", "prompt": "A?", "verdict": "ok"}, {"id": "b", "prompt": "B?", "verdict": "ok"},
               {"id": "c", "prompt": "C?", "verdict": "ok"}, {"id": "d", "prompt": "D?", "verdict": "ok"}]
    cands = [{"id": p, "sample": s, "text": f"{p}{s}", "n_tokens": 2} for p in "abcd" for s in range(3)]
    sc = {("a", 0): [4, 5], ("a", 1): [None, 2], ("a", 2): [5, 4],     # a: 4.5 (s0) vs 2 (s1); s2 ties s0
          ("b", 0): [3, 3], ("b", 1): [3, None], ("b", 2): [None, None],  # b: 3 vs 3 -> tie
          ("c", 0): [None, None], ("c", 1): [1, 1], ("c", 2): [None, None],  # c: one scored -> no pair
          ("d", 0): [0, 1], ("d", 1): [2, 2], ("d", 2): [1, 0]}          # d: 2 (s1) vs 0.5 (s0 first)
    judg = [{"id": p, "sample": s, "k": k, "judgment": "j", "score": v}
            for (p, s), vs in sc.items() for k, v in enumerate(vs)]
    pairs, counts = build_pairs(prompts, cands, judg)
    assert [(p["id"], p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == \
        [("a", "a0", "a1", 4.5, 2), ("d", "d1", "d0", 2, 0.5)]
    assert counts["ties"] == 1 and counts["prompts_too_few_scored"] == 1 and counts["candidates_unscored"] == 3
    st = iteration_stats(prompts + [{"id": "z", "prompt": "", "verdict": "empty"}], cands, judg, pairs, counts)
    c = st["counts"]
    assert (c["prompts"], c["prompts_made"], c["prompts_filtered"]) == (4, 5, {"empty": 1})
    assert (c["candidates"], c["judgments"], c["parse_failures"], c["ties"], c["pairs"]) == (12, 24, 8, 1, 2)
    assert st["score_histogram"] == {"0": 2, "1": 4, "2": 3, "3": 3, "4": 2, "5": 2}
    assert st["mean_len"]["chosen_chars"] == 2


def test_prompt_filter_verdicts():
    cfg = InstructConfig(min_words=3, max_words=12)
    f = PromptFilter(["How do I bake fresh bread at home today?"], cfg)
    assert f.check("") == ("empty", None)
    assert f.check("Hi there")[0] == "too_short"
    assert f.check(" ".join(["word"] * 13))[0] == "too_long"
    assert f.check("how do I  bake fresh bread at home TODAY?")[0] == "duplicate"
    assert f.check("Draw me a picture of a cat please")[0] == "keyword"
    v, r = f.check("How do I bake fresh bread at home tonight?")   # LCS 8 of 9 words each side: F = 8/9
    assert v == "rouge" and r == pytest.approx(8 / 9)
    v, r = f.check("What are good names for a pet turtle?")
    assert v == "ok" and r < 0.7
    f.add("What are good names for a pet turtle?")
    assert f.check("What are good names for a pet turtle, please?")[0] == "rouge"


def test_few_shot_prompt_shape():
    import random
    cfg = InstructConfig()
    seeds = [f"seed {i}" for i in range(10)]
    shots = pick_shots(random.Random(0), seeds, ["gen a", "gen b", "gen c"], cfg)
    assert len(shots) == 8 and sum(s.startswith("gen") for s in shots) == 2
    assert len(pick_shots(random.Random(0), seeds, ["gen a"], cfg)) == 8   # seeds fill in
    text = few_shot_text(shots, cfg.header)
    assert text.endswith("Request 9:\n") and Counter(text.split())["Request"] == 9
    assert cut_generated(" Tell me about owls.\nMore detail.\n\nRequest 10: x") == "Tell me about owls.\nMore detail."


def test_build_pairs_pools_identical_texts():
    # p: samples 0 and 2 say the same thing; judged 5 and 1 separately, they are one response scoring 3
    prompts = [{"id": "p", "prompt": "P?", "verdict": "ok"}, {"id": "q", "prompt": "Q?", "verdict": "ok"}]
    cands = [{"id": "p", "sample": 0, "text": "68"}, {"id": "p", "sample": 1, "text": "67"},
             {"id": "p", "sample": 2, "text": "68"},
             {"id": "q", "sample": 0, "text": "x"}, {"id": "q", "sample": 1, "text": "x"}]
    sc = {("p", 0): 5, ("p", 1): 2, ("p", 2): 1, ("q", 0): 5, ("q", 1): 1}
    judg = [{"id": p, "sample": s, "k": 0, "judgment": "j", "score": v} for (p, s), v in sc.items()]
    pairs, counts = build_pairs(prompts, cands, judg)
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == [("68", "67", 3, 2)]
    assert counts["identical_merged"] == 2 and counts["prompts_too_few_scored"] == 1   # q: one distinct text
    # without pooling, the same judgments pair a text with itself on q and pick 68 (5) over 68 (1) on p
    raw, _ = build_pairs(prompts, cands, judg, pool_identical=False)
    assert [(p["chosen"], p["rejected"]) for p in raw] == [("68", "68"), ("x", "x")]


def test_distinct_candidates_judged_once_and_pairs_unchanged():
    from selfreward.recipes.pairs import distinct_candidates
    cands = [{"id": "p", "sample": s, "text": t} for s, t in enumerate(["68", "69", "68", "70"])] + \
            [{"id": "q", "sample": s, "text": "5"} for s in range(3)]                 # q: one text, no pair
    keep = distinct_candidates(cands)
    assert [(c["id"], c["sample"]) for c in keep] == [("p", 0), ("p", 1), ("p", 3)]
    scores = {0: [5, 4], 1: [1, 2], 2: [5, 5], 3: [3, 3]}
    every = [{"id": "p", "sample": s, "k": k, "score": v} for s, vs in scores.items() for k, v in enumerate(vs)]
    once = [j for j in every if j["sample"] != 2]
    prompts = [{"id": "p", "prompt": "What is 23 plus 45?"}, {"id": "q", "prompt": "What is 2 plus 3?"}]
    pairs_once, counts = build_pairs(prompts, cands, once)
    pairs_every, _ = build_pairs(prompts, cands, every)
    assert [(p["chosen"], p["rejected"]) for p in pairs_once] == [("68", "69")] == \
        [(p["chosen"], p["rejected"]) for p in pairs_every]
    assert pairs_once[0]["chosen_score"] == 4.5 and counts["pairs"] == 1


def test_min_margin_drops_close_pairs():
    prompts = [{"id": "p", "prompt": "P"}, {"id": "q", "prompt": "Q"}]
    cands = [{"id": i, "sample": s, "text": f"{i}{s}"} for i in "pq" for s in range(2)]
    sc = {("p", 0): [5, 5, 1], ("p", 1): [1, 1, 1], ("q", 0): [5, 5, 5], ("q", 1): [1, 1, 1]}
    judg = [{"id": i, "sample": s, "score": v} for (i, s), vs in sc.items() for v in vs]
    all_pairs, _ = build_pairs(prompts, cands, judg)
    kept, counts = build_pairs(prompts, cands, judg, min_margin=4.0)
    assert [p["id"] for p in all_pairs] == ["p", "q"]            # gaps 2.67 and 4.0
    assert [p["id"] for p in kept] == ["q"] and counts["below_margin"] == 1 and counts["pairs"] == 1
