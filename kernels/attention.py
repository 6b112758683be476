"""Causal grouped-query attention over packed variable-length sequences.

Sequences are concatenated along the token axis and delimited by cumulative lengths `cu_seqlens`
([S+1], int32, starting at 0), the layout flash-attn's varlen functions use. Attention never crosses a
sequence boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_index(cu_seqlens: torch.Tensor):
    """Per-token (sequence, offset) for scattering a flat [N, ...] tensor into a padded [S, L, ...]."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    off = torch.arange(int(cu_seqlens[-1]), device=lens.device) - cu_seqlens[:-1].long()[seq]
    return seq, off, int(lens.max()) if len(lens) else 0


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int | None = None, scale: float | None = None) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D]; cu_seqlens: [S+1] -> [N, Hq, D].

    Pads to [S, L] and runs one batched causal SDPA: with right padding a real query only ever sees
    earlier real keys, so no extra mask is needed and the padded rows are dropped afterwards.
    """
    N, Hq, D = q.shape
    rep = Hq // k.shape[1]
    seq, off, L = _pad_index(cu_seqlens)
    S = len(cu_seqlens) - 1

    def pad(x):  # [N, h, D] -> [S, h, L, D]
        out = x.new_zeros(S, L, x.shape[1], D)
        out = out.index_put((seq, off), x)
        return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    if rep > 1:  # kv head j serves query heads j*rep .. j*rep+rep-1, as transformers' repeat_kv
        kp = kp.repeat_interleave(rep, dim=1)
        vp = vp.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)  # [S, Hq, L, D]
    return o.transpose(1, 2)[seq, off]


def attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    from selfreward.kernels import use_triton
    if use_triton(q):
        from selfreward.kernels.attention_triton import attention_triton
        return attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)
    return attention_ref(q, k, v, cu_seqlens, max_seqlen, scale)
