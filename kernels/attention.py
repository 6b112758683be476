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


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int | None = None, scale: float | None = None,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D]; cu_seqlens: [S+1]; prefix: [S, 2] (start, length) or None
    -> [N, Hq, D].

    One SDPA call per sequence on views of the flat tensors: no padding to the longest sequence, so no
    attention over padding and no padded copies (uneven chat lengths: 3.6x faster than one padded call,
    fwd + bwd, and as fast at equal lengths: benchmarks/README.md, "SmolLM2 shape (issue 30)"). A sequence
    with a prefix sees the prefix's keys, then its own causally: a lower-right causal mask over prefix + own.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    qs, ks, vs = q.split(lens), k.split(lens), v.split(lens)      # split: backward is one cat, not a zeros each
    seq_at = {s: i for i, s in enumerate(cu_seqlens[:-1].tolist())}
    out = []
    for i, (ps, pl) in enumerate(prefix.tolist() if prefix is not None else [(0, 0)] * len(lens)):
        kk, vv, mask = ks[i], vs[i], None
        if pl:
            p = seq_at.get(ps)
            whole = p is not None and lens[p] == pl                 # the layout pair_batch makes
            kk = torch.cat([ks[p] if whole else k[ps:ps + pl], kk])
            vv = torch.cat([vs[p] if whole else v[ps:ps + pl], vv])
            mask = torch.ones(lens[i], pl + lens[i], dtype=torch.bool, device=q.device).tril(pl)
        # [1, H, L, D] (4-D: the CPU flash kernel); kv head j serves query heads j*rep .. (enable_gqa, no copy)
        o = F.scaled_dot_product_attention(qs[i].transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                           vv.transpose(0, 1)[None], attn_mask=mask, is_causal=not pl,
                                           scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


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
