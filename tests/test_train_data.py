"""Trainer data: file:line + field errors, the three SFT formats, truncation rules, packing, pair batches,
batch order."""
from __future__ import annotations

import pytest

from selfreward.model.tokenizer import Tokenizer
from test_train_fixtures import make_spm, write_jsonl
from selfreward.train.data import (IGNORE, DataError, Example, global_batch, load_pairs, load_sft, pack_rows,
                        pair_batch, rank_micro_batches, sft_example, truncate_pair, Pair)
from selfreward.train.layouts import read_rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("spm")
    make_spm(d)
    return Tokenizer.load(d)


def test_bad_lines_name_file_line_and_field(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'text' should be str"):
        load_sft([str(p)], tok, 64)
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected a JSON object"):
        read_rows(p)
    p.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'response'"):
        load_sft([str(p)], tok, 64)
    p.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages\[0\]'"):
        load_sft([str(p)], tok, 64)
    p.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected'"):
        load_pairs([str(p)], tok, 64, 32)
    p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                 '"chosen": "c", "rejected": "d"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages' must end with a user turn"):
        load_pairs([str(p)], tok, 64, 32)


def test_sft_formats_and_masks(tok):
    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "The cat sat."}]
    a = sft_example({"messages": msgs}, tok, "x:1")
    b = sft_example({"prompt": "Tell me a story.", "response": "The cat sat."}, tok, "x:2")
    ids, mask = tok.render_chat(msgs)
    assert a.ids == b.ids == ids and a.mask == b.mask == mask
    # targets are exactly the reply and its EOS
    assert [t for t, m in zip(a.ids, a.mask) if m] == tok.encode("The cat sat.") + [tok.eos_id]
    c = sft_example({"text": "The dog ran."}, tok, "x:3")
    assert c.ids == [tok.bos_id] + tok.encode("The dog ran.") + [tok.eos_id]
    assert c.mask == [False] + [True] * (len(c.ids) - 1)
    s = sft_example({"prompt": "Hi.", "response": "Yes."}, tok, "x:4", system="Be kind.")
    assert s.ids == tok.render_chat([{"role": "system", "content": "Be kind."},
                                     {"role": "user", "content": "Hi."},
                                     {"role": "assistant", "content": "Yes."}])[0]


def test_truncation_rules_and_counts(tmp_path, tok):
    long = " ".join(["the big red cat sat on a mat"] * 10)
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi.", "response": long},
                                          {"prompt": long, "response": "Yes."},
                                          {"text": "one two"}])
    ex, counts = load_sft([str(p)], tok, max_length=24)
    assert counts == {"read": 3, "truncated": 2, "dropped": 1}   # the long prompt leaves no target
    full = sft_example({"prompt": "Hi.", "response": long}, tok, "x")
    assert ex[0].ids == full.ids[:24] and len(ex) == 2
    # DPO: prompt keeps BOS + its last tokens, responses their first ones
    pair = Pair(list(range(1, 21)), list(range(30, 45)), list(range(50, 53)))
    q, cut = truncate_pair(pair, max_length=16, max_prompt_length=6)
    assert cut and q.prompt == [1, 16, 17, 18, 19, 20]
    assert q.chosen == list(range(30, 40)) and q.rejected == [50, 51, 52]
    assert truncate_pair(Pair([1, 2], [3], [4]), 16, 6) == (Pair([1, 2], [3], [4]), False)


def test_packing_keeps_examples_apart():
    exs = [Example([1, 5, 6, 7], [False, False, True, True]), Example([1, 8, 9], [False, True, True]),
           Example([1, 4, 4, 4, 4, 4], [False] + [True] * 5)]
    rows = pack_rows(exs, row_len=6, pad_id=0, packing=True)
    # first-fit: [ex0 (3) + ex1 (2) + pad 1], [ex2 (5) + pad 1]
    assert rows["input_ids"].tolist() == [[1, 5, 6, 1, 8, 0], [1, 4, 4, 4, 4, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]]
    assert rows["targets"].tolist() == [[IGNORE, 6, 7, 8, 9, IGNORE], [4, 4, 4, 4, 4, IGNORE]]
    padded = pack_rows(exs, row_len=6, pad_id=0, packing=False)
    assert padded["input_ids"].shape == (3, 5)
    assert padded["targets"][1].tolist() == [8, 9, IGNORE, IGNORE, IGNORE]


def test_pair_batch_layout():
    b = pair_batch([Pair([1, 7], [3, 2], [4, 4, 2]), Pair([1], [5, 2], [6, 2])], share_prompt=False)
    # sequences: c0 = 1 7 3 2, c1 = 1 5 2, r0 = 1 7 4 4 2, r1 = 1 6 2 (inputs drop each last token)
    assert b.tokens.tolist() == [1, 7, 3, 1, 5, 1, 7, 4, 4, 1, 6]
    assert b.targets.tolist() == [IGNORE, 3, 2, 5, 2, IGNORE, 4, 4, 2, 6, 2]
    assert b.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9, 11] and b.max_seqlen == 4
    assert b.seq_id.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert b.resp_len.tolist() == [2, 2, 3, 2] and b.resp_len.numel() // 2 == 2
    assert b.out_seq.tolist() == [0, 1, 2, 3] and b.prefix is None


def test_pair_batch_shared_prompt_layout():
    b = pair_batch([Pair([1, 7], [3, 2], [4, 4, 2]), Pair([1], [5, 2], [6, 2])])
    # prompt 1 7: its first token once (1), then c0 = [7] 3 and r0 = [7] 4 4 reading it as their prefix,
    # positions continuing at 1; prompt [1] is BOS alone: no prefix, c1 = [1] 5, r1 = [1] 6
    assert b.tokens.tolist() == [1, 7, 3, 7, 4, 4, 1, 5, 1, 6]
    assert b.targets.tolist() == [IGNORE, 3, 2, 4, 4, 2, 5, 2, 6, 2]
    assert b.positions.tolist() == [0, 1, 2, 1, 2, 3, 0, 1, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 1, 3, 6, 8, 10] and b.max_seqlen == 3
    assert b.prefix.tolist() == [[0, 0], [0, 1], [0, 1], [0, 0], [0, 0]]
    assert b.out_seq.tolist() == [1, 3, 2, 4] and b.resp_len.tolist() == [2, 2, 3, 2]


def test_batch_order_is_a_function_of_seed_and_step():
    a = [global_batch(10, 4, s, seed=3) for s in range(4)]
    assert a == [global_batch(10, 4, s, seed=3) for s in range(4)]
    assert sorted(a[0] + a[1]) != list(range(8)) or a[0] != [0, 1, 2, 3]   # shuffled
    assert len(set(a[0] + a[1])) == 8                                      # an epoch has no repeats
    assert a[2] != a[0]                                                     # epoch 2 reshuffles
    assert rank_micro_batches(list(range(8)), world=2, rank=1, micro=2) == [[4, 5], [6, 7]]
    with pytest.raises(DataError, match="fewer than one global batch"):
        global_batch(3, 4, 0, seed=0)


def test_split_held_out_by_hand():
    from selfreward.train.data import split_held_out
    import random
    data = list("abcdefghij")
    train, held = split_held_out(data, 0.2, seed=3)
    order = list(range(10))
    random.Random(3).shuffle(order)                      # the same draw, by hand
    assert held == [data[i] for i in order[:2]] and train == [x for x in data if x not in held]
    assert split_held_out(data, 0.01, 0)[1] and len(split_held_out(data, 0.01, 0)[1]) == 1   # at least one
