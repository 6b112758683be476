"""The attention twin (kernels.attention.attention_ref, one SDPA call per sequence) against dense softmax
attention written out per sequence: uneven lengths, GQA, prefixes (whole sequences and a bare key range),
values and gradients within 1e-5 fp32."""
import math

import torch

from selfreward.kernels.attention import attention_ref


def dense(q, k, v, lens, prefix):
    """Per sequence: scores over [prefix keys, own keys], prefix visible in full, own keys causally."""
    rep, out, s = q.shape[1] // k.shape[1], [], 0
    for n, (ps, pl) in zip(lens, prefix):
        kk = torch.cat([k[ps:ps + pl], k[s:s + n]]).repeat_interleave(rep, 1)        # [pl + n, Hq, D]
        vv = torch.cat([v[ps:ps + pl], v[s:s + n]]).repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:s + n], kk) / math.sqrt(q.shape[-1])
        visible = torch.ones(n, pl + n, dtype=torch.bool).tril(pl)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", p, vv))
        s += n
    return torch.cat(out)


def test_per_sequence_twin_equals_dense_attention():
    g = torch.Generator().manual_seed(0)
    # a prompt (7), its two replies (uneven), a plain sequence of 1, a prompt (5) and one reply, and a reply
    # whose prefix is a key range inside a sequence rather than a whole one
    lens = [7, 13, 2, 1, 5, 9, 4]
    prefix = [(0, 0), (0, 7), (0, 7), (0, 0), (0, 0), (23, 5), (24, 3)]
    N, Hq, Hkv, D = sum(lens), 6, 2, 16
    q, k, v = (torch.randn(N, h, D, generator=g, dtype=torch.float64).float().requires_grad_(True)
               for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    dout = torch.randn(N, Hq, D, generator=g)
    got = attention_ref(q, k, v, cu, max(lens), None, torch.tensor(prefix, dtype=torch.int32))
    want = dense(q, k, v, lens, prefix)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad((got * dout).sum(), (q, k, v))
    g2 = torch.autograd.grad((want * dout).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # no prefix argument: every sequence plain causal
    plain = attention_ref(q, k, v, cu, max(lens))
    torch.testing.assert_close(plain, dense(q, k, v, lens, [(0, 0)] * len(lens)), rtol=1e-5, atol=1e-5)
