"""OASST builders: IFT, ranked groups and EFT on tests/data/oasst_20_trees.jsonl (20 of the shared trees, in
every clone) and on the shared 100-tree export; held-out trees in no training file; flat table (JSONL, or the
hub's parquet) == trees; errors."""
import json
import random
from collections import Counter

import pytest

from selfreward.records import DataError, read_jsonl
from selfreward.recipes.oasst import agrees_with_humans, build_eft, ift_pairs, load_messages, main, ranked_groups, \
    split_groups
from selfreward.train.layouts import read_rows
from conftest import OASST_20


def _flatten(tree_file, out, shuffle_seed=0):
    """The tree export rewritten as a flat message table, in shuffled order (parents may follow children)."""
    rows = []

    def walk(m, parent):
        rows.append({"message_id": m["message_id"], "parent_id": parent, "role": m["role"], "lang": m.get("lang"),
                     "text": m["text"], "rank": m.get("rank"), "deleted": m.get("deleted", False)})
        for c in m.get("replies", []):
            walk(c, m["message_id"])
    for line in open(tree_file):
        walk(json.loads(line)["prompt"], None)
    order = list(range(len(rows)))
    random.Random(shuffle_seed).shuffle(order)
    # siblings keep their relative order (ranked groups list them as the export does)
    out.write_text("".join(json.dumps(rows[i]) + "\n" for i in sorted(order, key=lambda i: (order.index(i) % 7, i))))
    return len(rows)


def test_oasst_100_trees_counts(tmp_path):
    from conftest import need_shared
    src = need_shared("data/oasst_en_100_trees.jsonl")
    roots = load_messages(src)
    ift = ift_pairs(roots)
    first, every = ranked_groups(roots), ranked_groups(roots, first_turn_only=False)
    # ../shared/README.md: 212 sibling groups with 2+ ranked assistant replies, 99 at the root, sizes 2..9
    assert (len(roots), len(ift), len(first), len(every)) == (100, 99, 99, 212)
    assert {len(g["replies"]) for g in every} <= set(range(2, 10))
    assert all(g["replies"][0]["rank"] == 0 for g in first)
    train, held = split_groups(first, 0.25, seed=0)
    assert len(train) + len(held) == 99 and not {g["id"] for g in train} & {g["id"] for g in held}
    assert split_groups(list(reversed(first)), 0.25, 0)[1] == list(reversed(held))  # order-independent
    print(f"\nOASST 100 trees: IFT {len(ift)}, groups turn-1 {len(first)} (train {len(train)} / "
          f"eval {len(held)}), all turns {len(every)}")
    # the CLI splits by tree first (the same hash, so the same turn-1 groups); IFT only from the training trees
    counts = main(["--input", str(src), "--out", str(tmp_path / "seed")])
    assert counts == {"trees": 100, "trees_train": 74, "trees_eval": 26, "ift": 73, "groups_train": len(train),
                      "groups_eval": len(held)} and (len(train), len(held)) == (73, 26)
    assert sum(1 for _ in open(tmp_path / "seed" / "ift.jsonl")) == 73
    assert _leaks(tmp_path / "seed") == []


def _strings(rec) -> list[str]:
    if isinstance(rec, str):
        return [rec]
    if isinstance(rec, dict):
        rec = list(rec.values())
    return [s for v in rec for s in _strings(v)] if isinstance(rec, list) else []


def _leaks(seed_dir) -> list[str]:
    """Held-out texts (groups_eval.jsonl: each prompt and every reply) found in a training file: equal to one
    of its strings, or (texts of 40+ characters) inside one, as a transcript or judge prompt would hold it."""
    held = {t for g in read_jsonl(seed_dir / "groups_eval.jsonl") for t in [g["prompt"]] + [r["text"] for r in g["replies"]]}
    assert held, "no held-out group: the test would prove nothing"
    train = [s for name in ("ift.jsonl", "groups_train.jsonl", "eft_train.jsonl") if (seed_dir / name).exists()
             for rec in read_jsonl(seed_dir / name) for s in _strings(rec)]
    exact = set(train)
    return sorted(h[:60] for h in held if h in exact or (len(h) >= 40 and any(h in s for s in train)))


@pytest.mark.parametrize("all_turns", [False, True])
def test_heldout_trees_in_no_training_file(tmp_path, all_turns):
    """Issue 13 item 1: no held-out prompt or reply reaches ift.jsonl / groups_train.jsonl (self-instruct seeds
    come from ift.jsonl), at the first turn and at every depth."""
    out = tmp_path / "seed"
    counts = main(["--input", str(OASST_20), "--out", str(out)] + (["--all-turns"] if all_turns else []))
    assert (counts["trees"], counts["trees_train"], counts["trees_eval"]) == (20, 14, 6)
    assert counts["ift"] == 13                      # the 14 training trees, one of which has no rank-0 reply
    assert _leaks(out) == []
    held_ids = {g["id"] for g in read_jsonl(out / "groups_eval.jsonl")}
    assert not held_ids & {r["id"] for r in read_jsonl(out / "ift.jsonl")}


def test_flat_table_gives_same_ift(tmp_path):
    src = OASST_20
    n = _flatten(src, tmp_path / "flat.jsonl")
    roots_t, roots_f = load_messages(src), load_messages(tmp_path / "flat.jsonl")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(ift_pairs(roots_t), key=key) == sorted(ift_pairs(roots_f), key=key)
    assert sorted(ranked_groups(roots_t, first_turn_only=False), key=key) == \
        sorted(ranked_groups(roots_f, first_turn_only=False), key=key)
    assert n > 20 and len(ranked_groups(roots_t, first_turn_only=False)) > len(ranked_groups(roots_t))


def test_hub_parquet_gives_same_ift(tmp_path):
    """OpenAssistant/oasst1 on the hub is this flat table as parquet (nulls in parent_id and rank): read as is."""
    datasets = pytest.importorskip("datasets")
    _flatten(OASST_20, tmp_path / "flat.jsonl")
    rows = [r for _, r in read_rows(tmp_path / "flat.jsonl")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "flat.parquet"))
    roots_t, roots_p = load_messages(OASST_20), load_messages(tmp_path / "flat.parquet")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(ift_pairs(roots_t), key=key) == sorted(ift_pairs(roots_p), key=key) != []
    assert sorted(ranked_groups(roots_t), key=key) == sorted(ranked_groups(roots_p), key=key) != []


def test_eft_builder_scripted_judge():
    groups = ranked_groups(load_messages(OASST_20))
    flip = {g["id"] for g in groups[::3]}              # a third of the groups judged backwards
    by_text = {r["text"]: (g["id"], r["rank"]) for g in groups for r in g["replies"]}
    size = {g["id"]: len(g["replies"]) for g in groups}

    def fwd(gid, rank):  # 4, 3, 2, ... ; pairs get 4, 1 so that 4 is the most common score
        return float(max(0, 4 - rank * (3 if size[gid] == 2 else 1)))

    def judge(items):
        out = []
        for ins, resp in items:
            gid, rank = by_text[resp]
            s = float(rank) if gid in flip else fwd(gid, rank)
            out.append((f"J[{ins}|{resp}]", f"reasons\nScore: {int(s)}", s))
        return out
    ex, st = build_eft(groups, judge, seed=1)
    kept_groups = {e["group"] for e in ex}
    # kept: the groups judged forwards whose ranks all stay distinct after clipping at 0 (rank <= 4)
    fine = [g for g in groups if g["id"] not in flip and max(r["rank"] for r in g["replies"]) <= 4
            and len({r["rank"] for r in g["replies"]}) == len(g["replies"])]
    assert st["groups_kept"] == len(fine) == len(kept_groups) and not kept_groups & flip
    before = [fwd(g["id"], r["rank"]) for g in fine for r in g["replies"]]
    assert st["examples_before_downsample"] == len(before)
    # the most common score (4: every kept group's best) is cut to the count of the next most common one
    (top, n_top), (nxt, n_next) = Counter(before).most_common(2)
    assert top == 4 and n_top > n_next
    hist = st["score_histogram"]
    assert hist["4.0"] == hist[str(nxt)] == n_next and st["downsampled_dropped"] == n_top - n_next
    assert all(hist[str(k)] == v for k, v in Counter(before).items() if k != 4)
    assert ex[0]["messages"][0]["role"] == "user" and ex[0]["messages"][1]["content"].endswith(f"Score: {int(ex[0]['score'])}")
    print(f"\nEFT (scripted judge): {st}")


def test_agreement_rule():
    assert agrees_with_humans([0, 1, 2], [5, 3, 1])
    assert not agrees_with_humans([0, 1, 2], [5, 5, 1])       # a tie is not an ordering
    assert not agrees_with_humans([0, 1], [4, None])
    assert agrees_with_humans([0, 1, 1], [4, 2, 3])            # human ties impose nothing


def test_bad_input_names_file_line_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"message_id": "a", "parent_id": null, "role": "prompter", "text": "hi"}\n'
                 '{"message_id": "b", "parent_id": "a", "role": "assistant", "text": "yo", "rank": "first"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rank'"):
        load_messages(f)
    f.write_text('{"message_id": "b", "parent_id": "zz", "role": "assistant", "text": "yo"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'parent_id' names 'zz'"):
        load_messages(f)
    f.write_text('{"prompt": {"message_id": "a", "role": "prompter"}}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'text'"):
        load_messages(f)
    f.write_text('{"x": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: neither"):
        load_messages(f)
