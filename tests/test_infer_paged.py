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
