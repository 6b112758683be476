"""OASST builders: the shared 100-tree export through IFT, ranked groups and EFT; flat table == trees; errors."""
import json
import random
from collections import Counter

import pytest

from selfreward.records import DataError
from selfreward.recipes.oasst import agrees_with_humans, build_eft, ift_pairs, load_messages, main, ranked_groups, \
    split_groups


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
    from tests.conftest import need_shared
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
    # the CLI writes the same
    counts = main(["--input", str(src), "--out", str(tmp_path / "seed")])
    assert counts == {"trees": 100, "ift": 99, "groups_train": len(train), "groups_eval": len(held)}
    assert sum(1 for _ in open(tmp_path / "seed" / "ift.jsonl")) == 99


def test_flat_table_gives_same_ift(tmp_path):
    from tests.conftest import need_shared
    src = need_shared("data/oasst_en_100_trees.jsonl")
    n = _flatten(src, tmp_path / "flat.jsonl")
    roots_t, roots_f = load_messages(src), load_messages(tmp_path / "flat.jsonl")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(ift_pairs(roots_t), key=key) == sorted(ift_pairs(roots_f), key=key)
    assert sorted(ranked_groups(roots_t, first_turn_only=False), key=key) == \
        sorted(ranked_groups(roots_f, first_turn_only=False), key=key)
    assert n > 100


def test_eft_builder_scripted_judge():
    from tests.conftest import need_shared
    groups = ranked_groups(load_messages(need_shared("data/oasst_en_100_trees.jsonl")))
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
