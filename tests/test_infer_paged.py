"""The paged attention twins (kernels/paged.py, sped up for the CPU sampler) against plain causal attention."""
import torch

from selfreward.kernels.attention import attention_ref
from selfreward.kernels.paged import paged_decode_ref, paged_prefill_ref, store_kv_ref


def test_paged_twins_equal_contiguous_attention(monkeypatch):
    from selfreward.kernels import paged
    monkeypatch.setattr(paged, "DECODE_ROWS", 3)   # several row groups of different lengths
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, bs, nblocks = 6, 2, 8, 4, 40
    lens, cached = [5, 13, 1, 9], [0, 6, 0, 8]          # context lengths; tokens already in the cache
    kc, vc = torch.zeros(nblocks, bs, Hkv, D), torch.zeros(nblocks, bs, Hkv, D)
    perm = torch.randperm(nblocks, generator=g)          # scattered blocks, as after a while of serving
    tables, used = [], 0
    for L in lens:
        n = (L + bs - 1) // bs
        tables.append(perm[used:used + n].tolist() + [0] * (4 - n))
        used += n
    bt = torch.tensor(tables, dtype=torch.int32)
    q = [torch.randn(L, Hq, D, generator=g) for L in lens]
    k = [torch.randn(L, Hkv, D, generator=g) for L in lens]
    v = [torch.randn(L, Hkv, D, generator=g) for L in lens]
    for s, L in enumerate(lens):                          # store everything (slot = block * bs + offset)
        pos = torch.arange(L)
        store_kv_ref(k[s], v[s], kc, vc, bt[s, pos // bs].long() * bs + pos % bs)
    cu_full = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    ref = attention_ref(torch.cat(q), torch.cat(k), torch.cat(v), cu_full).split(lens)
    ctx = torch.tensor(lens, dtype=torch.int32)
    # prefill of the uncached tail of each sequence
    qlens = [L - c for L, c in zip(lens, cached)]
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    got = paged_prefill_ref(torch.cat([x[c:] for x, c in zip(q, cached)]), kc, vc, cu, bt, ctx).split(qlens)
    for s, c in enumerate(cached):
        assert torch.allclose(got[s], ref[s][c:], atol=1e-5)
    # decode: the last token of each sequence
    got = paged_decode_ref(torch.stack([x[-1] for x in q]), kc, vc, bt, ctx)
    assert torch.allclose(got, torch.stack([r[-1] for r in ref]), atol=1e-5)


def _dense_decode(q, kc, vc, bt, lens):
    """fp64 softmax attention of each row's one query over its context, read token by token from the blocks."""
    B, Hq, D = q.shape
    G, bs, out = Hq // kc.shape[2], kc.shape[1], []
    for b, L in enumerate(lens.tolist()):
        slots = [int(bt[b, t // bs]) * bs + t % bs for t in range(L)]
        k = kc.reshape(-1, *kc.shape[2:])[slots].double().repeat_interleave(G, 1)   # [L, Hq, D]
        v = vc.reshape(-1, *vc.shape[2:])[slots].double().repeat_interleave(G, 1)
        p = (torch.einsum("hd,lhd->hl", q[b].double(), k) / D ** 0.5).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(out)


def test_cascade_decode_equals_dense_attention(monkeypatch):
    """`shared` leading blocks (one prefix for every row, attended once and merged by log-sum-exp) give each
    row's plain attention: GQA and not, rows in several groups, fp32 and bf16."""
    from selfreward.kernels import paged
    monkeypatch.setattr(paged, "DECODE_ROWS", 4)
    g = torch.Generator().manual_seed(1)
    for Hq, Hkv, dtype, tol in ((6, 2, torch.float32, 1e-5), (4, 4, torch.float32, 1e-5), (6, 2, torch.bfloat16, 2e-2)):
        B, D, bs, shared = 9, 16, 4, 3
        kc = torch.randn(80, bs, Hkv, D, generator=g).to(dtype)
        vc = torch.randn(80, bs, Hkv, D, generator=g).to(dtype)
        own = torch.randperm(77, generator=g)[:B * 5].view(B, 5) + 3     # blocks 0..2 are the shared prefix
        bt = torch.cat([torch.tensor([[2, 0, 1]]).expand(B, 3), own], 1).to(torch.int32)
        lens = torch.randint(shared * bs + 1, 8 * bs + 1, (B,), generator=g).to(torch.int32)
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
        ref = _dense_decode(q, kc, vc, bt, lens)
        for s in (0, shared):
            got = paged_decode_ref(q, kc, vc, bt, lens, shared=s)
            assert got.dtype == dtype and (got.double() - ref).abs().max() < tol, (Hq, Hkv, dtype, s)


def test_shared_blocks_counts_only_full_common_blocks():
    from selfreward.infer.runner import shared_blocks
    from selfreward.infer.sequence import SamplingParams, Sequence

    def seq(n_tokens, table):
        s = Sequence(list(range(n_tokens)), SamplingParams())
        s.block_table = table
        return s
    bs = 4
    # tokens 0..9 -> newest at position 9: blocks 0 and 1 lie wholly before it, block 2 holds it
    assert shared_blocks([seq(10, [7, 3, 5]), seq(10, [7, 3, 6])], bs) == 2
    assert shared_blocks([seq(10, [7, 3, 5]), seq(10, [7, 4, 5])], bs) == 1     # they part at block 1
    assert shared_blocks([seq(10, [7, 3, 5]), seq(6, [7, 3])], bs) == 1        # position 5 is in block 1
    assert shared_blocks([seq(9, [7, 3, 5]), seq(9, [7, 3, 5])], bs) == 2      # block 2 holds position 8: not counted
    assert shared_blocks([seq(10, [7, 3, 5])], bs) == 0                        # one row: nothing to share
