"""Causal grouped-query attention over packed variable-length sequences, optionally with shared prefixes.

Sequences are concatenated along the token axis and delimited by cumulative lengths `cu_seqlens`
([S+1], int32, starting at 0), the layout flash-attn's varlen functions use. Attention never crosses a
sequence boundary, except into a sequence's prefix.

Prefix segments (shared-prompt DPO: one prompt, several replies): `prefix` [S, 2] int32 gives, per
sequence, (start, length) of a flat key range that every query of the sequence sees in full, before its
own keys (causally). Length 0 = no prefix. A sequence with a prefix cannot itself be one, and the
sequences that share one prefix lie next to each other (the Triton backward needs the range of queries
that read a prefix's keys; `prefix_dependents` computes it).
"""

import torch
import torch.nn.functional as F


def pad_index(cu_seqlens: torch.Tensor):
    """Per-token (sequence, offset) and the longest length: `to_padded` scatters a flat [N, h, D] into a
    padded [S, h, L, D]; o.transpose(1, 2)[seq, off] takes it back."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    off = torch.arange(int(cu_seqlens[-1]), device=lens.device) - cu_seqlens[:-1].long()[seq]
    return seq, off, int(lens.max()) if len(lens) else 0


def to_padded(x: torch.Tensor, seq: torch.Tensor, off: torch.Tensor, S: int, L: int) -> torch.Tensor:
    return x.new_zeros(S, L, *x.shape[1:]).index_put((seq, off), x).transpose(1, 2)


def _causal_padded(q, k, v, cu_seqlens, scale):
    seq, off, L = pad_index(cu_seqlens)
    qp, kp, vp = (to_padded(x, seq, off, len(cu_seqlens) - 1, L) for x in (q, k, v))
    # kv head j serves query heads j*rep .. j*rep+rep-1 (enable_gqa: as transformers' repeat_kv, no copy)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])   # [S, Hq, L, D]
    return o.transpose(1, 2)[seq, off]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int | None = None, scale: float | None = None,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D]; cu_seqlens: [S+1]; prefix: [S, 2] (start, length) or None
    -> [N, Hq, D].

    Sequences without a prefix are padded to [S, L] and run through one batched causal SDPA: with right
    padding a real query only ever sees earlier real keys, so no extra mask is needed and the padded rows
    are dropped afterwards. Sequences with a prefix go through a second, masked SDPA.
    """
    if prefix is None or not bool((prefix[:, 1] > 0).any()):
        return _causal_padded(q, k, v, cu_seqlens, scale)
    has = prefix[:, 1] > 0                                                      # [S]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tok_has = torch.repeat_interleave(has, lens)                                # [N]
    out = q.new_zeros(q.shape)
    if bool((~has).any()):             # the others, with their own cu_seqlens
        plain, cu = ~tok_has, torch.cat([cu_seqlens.new_zeros(1), lens[~has].cumsum(0).to(cu_seqlens.dtype)])
        out = out.index_put((plain,), _causal_padded(q[plain], k[plain], v[plain], cu, scale))
    o_h = _prefixed_padded(q, k, v, cu_seqlens[:-1][has].long(), lens[has], prefix[has], scale)
    return out.index_put((tok_has,), o_h)


def _prefixed_padded(q, k, v, starts, lens, prefix, scale):
    """Sequences with a prefix: queries [S, Lq] (own tokens from flat `starts`), keys [S, Lk] = prefix then
    own tokens, with an explicit mask (key j visible to query i if j is in the prefix or j - plen <= i)."""
    pst, plen = prefix[:, 0].long(), prefix[:, 1].long()
    i, j = torch.arange(int(lens.max()), device=q.device), torch.arange(int((plen + lens).max()), device=q.device)
    q_ok = i[None] < lens[:, None]                                              # [S, Lq]
    q_idx = torch.where(q_ok, starts[:, None] + i[None], 0)
    in_pre = j[None] < plen[:, None]                                            # [S, Lk]
    own = j[None] - plen[:, None]
    k_ok = in_pre | (own < lens[:, None])
    k_idx = torch.where(k_ok, torch.where(in_pre, pst[:, None] + j[None], starts[:, None] + own), 0)
    mask = k_ok[:, None, :] & (in_pre[:, None, :] | (own[:, None, :] <= i[None, :, None]))  # [S, Lq, Lk]
    qp = q[q_idx].transpose(1, 2)                                               # [S, Hq, Lq, D]
    kp, vp = k[k_idx].transpose(1, 2), v[k_idx].transpose(1, 2)                 # [S, Hkv, Lk, D]
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])     # [S, Hq, Lq, D]
    return o.transpose(1, 2)[q_ok]                                              # [n, Hq, D] in token order


def prefix_dependents(cu_seqlens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """[S, 2] int32: for each sequence, the flat query range [start, end) of the sequences whose prefix it
    is (empty: none). Checks the layout rules in the module docstring."""
    cu, pre = cu_seqlens.tolist(), prefix.tolist()
    starts = {c: s for s, c in enumerate(cu[:-1])}
    dep = [[0, 0] for _ in pre]
    for s, (ps, pl) in enumerate(pre):
        if pl == 0:
            continue
        p = starts.get(ps)
        if p is None or cu[p + 1] - cu[p] != pl or pre[p][1]:
            raise ValueError(f"attention: sequence {s}'s prefix ({ps}, {pl}) is not a whole unprefixed sequence")
        d = dep[p]
        if d[1] == 0:
            d[0], d[1] = cu[s], cu[s + 1]
        elif d[1] == cu[s]:
            d[1] = cu[s + 1]
        else:
            raise ValueError(f"attention: the sequences sharing prefix sequence {p} are not adjacent")
    return torch.tensor(dep, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)
