"""Block manager bookkeeping and the sampler's filters, checked by hand-computed expectations."""
import pytest
import torch

from selfreward.infer import block_manager as bmod
from selfreward.infer.block_manager import BlockManager
from selfreward.infer.sampling import sample
from selfreward.infer.scheduler import Scheduler
from selfreward.infer.sequence import SamplingParams, Sequence


def _seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def test_refcounts_free_list_and_prefix_hits():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10))                        # blocks: [0..3] [4..7] [8, 9]
    assert bm.allocate(a) and len(a.block_table) == 3 and a.num_cached == 0
    assert bm.num_free == 5
    b = _seq(list(range(8)) + [50, 51, 52])    # same first two full blocks
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached == 8
    assert [bm.blocks[i].ref for i in a.block_table] == [2, 2, 1]
    bm.free_seq(a)
    assert [bm.blocks[i].ref for i in b.block_table[:2]] == [1, 1] and bm.num_free == 5
    bm.free_seq(b)
    assert bm.num_free == 8
    # freed blocks keep their keys: the prefix is found again, and taken back off the free list
    c = _seq(list(range(8)) + [99])
    assert bm.allocate(c) and c.num_cached == 8 and bm.num_free == 5
    # the block holding the last token is never served from the cache (its output must be computed)
    d = _seq(range(8))
    assert bm.allocate(d) and d.num_cached == 4


def test_hit_is_verified_against_tokens(monkeypatch):
    monkeypatch.setattr(bmod, "chain_key", lambda prev, tokens: 7)   # every block collides
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq([1, 2, 3, 4, 5])
    assert bm.allocate(a)
    b = _seq([9, 9, 9, 9, 5])
    assert bm.allocate(b) and b.num_cached == 0 and b.block_table[0] != a.block_table[0]


def test_copy_on_write_of_shared_partial_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    p = _seq(range(6))                          # [0..3] [4, 5, _, _]
    assert bm.allocate(p)
    p.num_cached = 6
    kids = [_seq(range(6)) for _ in range(2)]
    for k in kids:
        bm.fork(p, k)
    shared_partial = p.block_table[1]
    assert bm.blocks[shared_partial].ref == 3
    for s, t in zip([p] + kids, (10, 11, 12)):
        s.token_ids.append(t)
    copies = []
    for s in [p] + kids:
        assert bm.can_append(s)
        bm.append(s)
        copies += bm.take_copies()
    assert len(copies) == 2 and all(src == shared_partial for src, _ in copies)
    assert len({s.block_table[1] for s in [p] + kids}) == 3           # each now has its own last block
    assert len({s.block_table[0] for s in [p] + kids}) == 1           # the full block stays shared
    assert bm.blocks[p.block_table[0]].ref == 3 and bm.num_free == 6 - 4


def test_scheduler_chunks_interleaves_and_preempts():
    bm = BlockManager(num_blocks=4, block_size=2)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=5)
    seqs = [_seq([i, i + 1, i + 2]) for i in (10, 20, 30)]
    for s in seqs:
        sch.add(s)
    batch, prefill = sch.schedule()           # budget 5: seq 0 whole (3), seq 1 a chunk of 2
    assert prefill and batch == seqs[:2] and [s.chunk for s in batch] == [3, 2] and sch.partial is seqs[1]
    # only computed full blocks are keyed: seq 1's first block (its chunk), not its second
    assert seqs[1].num_keyed == 1 and bm.blocks[seqs[1].block_table[1]].key is None
    seqs[0].num_cached, seqs[1].num_cached = 3, 2
    seqs[0].token_ids.append(1)               # seq 0 sampled its first token and runs; seq 1 waits
    sch.running.extend(seqs[:1])
    batch, prefill = sch.schedule()           # a decode step between two chunks of seq 1
    assert not prefill and batch == seqs[:1]
    seqs[0].num_cached = 4
    seqs[0].token_ids.append(1)               # 5 tokens: position 4 needs a third block
    batch, prefill = sch.schedule()           # seq 1's last chunk; seq 2 finds no free block
    assert prefill and batch == seqs[1:2] and seqs[1].chunk == 1 and sch.partial is None
    assert list(sch.waiting) == seqs[2:]
    seqs[1].num_cached = 3
    seqs[1].token_ids.append(1)
    sch.running.extend(seqs[1:2])
    # no free blocks (4 used): the next decode must preempt the most recently admitted sequence
    batch, prefill = sch.schedule()
    assert not prefill and batch == seqs[:1] and sch.num_preempted == 1
    assert list(sch.waiting)[:2] == [seqs[1], seqs[2]] and seqs[1].block_table == []


def _draw(logits, n, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    row = logits[None].expand(n, -1).contiguous()
    return sample(row, [kw.get("t", 1.0)] * n, [kw.get("p", 1.0)] * n, [kw.get("k", 0)] * n, gens)


def test_sampler_filters_and_frequencies():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    n = 4000
    free = torch.bincount(_draw(logits, n), minlength=4).float() / n
    assert torch.allclose(free, probs, atol=0.03)
    top_p = torch.bincount(_draw(logits, n, p=0.7), minlength=4).float() / n   # keeps {1, 3}
    assert top_p[0] == 0 and top_p[2] == 0 and abs(top_p[1] - 0.5 / 0.8) < 0.03
    top_k = torch.bincount(_draw(logits, n, k=3), minlength=4).float() / n     # keeps {1, 3, 2}
    assert top_k[0] == 0 and abs(top_k[2] - 0.15 / 0.95) < 0.03
    cold = torch.bincount(_draw(logits, n, t=0.5), minlength=4).float() / n    # p^2, renormalised
    assert torch.allclose(cold, probs**2 / (probs**2).sum(), atol=0.03)
    assert (_draw(logits, 50, k=1) == 1).all() and (_draw(logits, 50, t=0.0) == 1).all()
    # a row's draw does not depend on the other rows
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    alone = sample(logits[None], [1.0], [0.9], [0], [g1])
    batch = torch.stack([torch.randn(4), logits, torch.randn(4)])
    mixed = sample(batch, [0.7, 1.0, 0.0], [1.0, 0.9, 1.0], [2, 0, 0],
                   [torch.Generator().manual_seed(1), g2, None])
    assert alone[0] == mixed[1]


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.parametrize("max_boundary", [256, 4])
def test_top_p_without_sort_equals_sorted_rule(monkeypatch, max_boundary):
    from selfreward.infer import sampling as S
    monkeypatch.setattr(S, "MAX_BOUNDARY", max_boundary)
    g = torch.Generator().manual_seed(0)
    for scale in (0.3, 1.0, 4.0, 12.0):                  # near-uniform .. peaked
        q = (torch.randn(8, 3000, generator=g) * scale).softmax(-1)
        q[0, :1500] = q[0, 1500:].flip(0)                 # exact ties
        q[0] /= q[0].sum()
        p = torch.rand(8, generator=g) * 0.95 + 0.02
        assert torch.equal(S.top_p_keep(q, p), S._top_p_keep_sorted(q, p))
    q = torch.full((2, 50), 1 / 50)                        # all tied: keep all
    assert S.top_p_keep(q, torch.tensor([0.5, 0.99])).all()
