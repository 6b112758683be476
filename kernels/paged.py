"""Paged KV cache: store keys/values into fixed-size blocks, attend over a block table.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, Hkv, D]. A token's slot is
block_id * block_size + offset; slot -1 means "do not store" (padding). A sequence's block table row
lists its block ids in order; entries past its length are ignored (fill with 0 or -1).
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


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v: [N, Hkv, D]; slot_mapping: [N] int -> writes in place."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):           # the sampler's steps store every token (no boolean gathers)
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    for x, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping.long(), x.to(cache.dtype))


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's newest queries over its whole cached context.

    q: [N, Hq, D], the last qlen_s tokens of sequence s (their K/V already stored);
    cu_seqlens_q: [S+1]; block_tables: [S, max_blocks]; context_lens: [S] (cached + new tokens).
    Query i of sequence s sits at absolute position context_len_s - qlen_s + i and sees keys 0..that.
    Returns [N, Hq, D].

    Sequences are padded to a common length per SDPA call, so sequences of very different query lengths
    (a whole prompt next to tails after a prefix-cache hit) go in separate calls: sorted by query length,
    a group closes where the length more than doubles (padding stays under half of each call).
    """
    qlens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    groups: list[list[int]] = []
    for i in sorted(range(len(qlens)), key=qlens.__getitem__):
        if groups and qlens[i] <= 2 * max(1, qlens[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) == 1:
        return _paged_prefill_padded(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, scale)
    cu = cu_seqlens_q.tolist()
    out = torch.empty_like(q)
    for g in groups:
        rows = torch.cat([torch.arange(cu[i], cu[i + 1], device=q.device) for i in g])
        sel = torch.tensor(g, device=q.device)
        gcu = torch.tensor([0] + [qlens[i] for i in g], device=q.device).cumsum(0)
        out[rows] = _paged_prefill_padded(q[rows], k_cache, v_cache, gcu, block_tables[sel], context_lens[sel], scale)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, L: int) -> torch.Tensor:
    """[S, Hkv, nb * bs, D]: the cached rows of each sequence's first L tokens, in whole blocks."""
    bs = cache.shape[1]
    bt = block_tables[:, :(L + bs - 1) // bs].long().clamp_min(0)
    return cache.index_select(0, bt.reshape(-1)).view(bt.shape[0], bt.shape[1] * bs, *cache.shape[2:]).transpose(1, 2)


def _paged_prefill_padded(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, scale):
    seq, off, Lq = pad_index(cu_seqlens_q)
    Lk, ctx = int(context_lens.max()), context_lens.long()
    kp, vp = (_gather(c, block_tables, Lk)[:, :, :Lk] for c in (k_cache, v_cache))   # [S, Hkv, Lk, D]
    qlens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    qpos = (ctx - qlens)[:, None] + torch.arange(Lq, device=q.device)[None, :]   # [S, Lq]
    kpos = torch.arange(Lk, device=q.device)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    o = F.scaled_dot_product_attention(to_padded(q, seq, off, len(qlens), Lq), kp, vp, attn_mask=mask[:, None],
                                       scale=scale, enable_gqa=q.shape[1] != k_cache.shape[2])
    return o.transpose(1, 2)[seq, off]


DECODE_ROWS = 8   # rows per gather in the CPU decode twin


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float | None = None, shared: int = 0) -> torch.Tensor:
    """One new query per sequence. q: [B, Hq, D] -> [B, Hq, D].

    `shared`: the first `shared` entries of every row's block table are the same full blocks (a prompt prefix
    all rows share: the judge's rubric, one prompt's N samples); they are attended once for all rows and
    merged with the rest by log-sum-exp (cascade attention), so their K/V are read once, not once per row.

    The rest: rows are taken in consecutive groups of DECODE_ROWS; each group gathers its blocks up to its
    own longest context (one index_select) and makes one GQA SDPA call with a length mask. On a CPU the
    gather is the cost, so a caller that orders sequences by length (infer/runner does) gathers little
    padding."""
    if shared and q.shape[0] > 1:
        return _cascade(q, k_cache, v_cache, block_tables, context_lens, scale, shared)
    return _decode_rows(q, k_cache, v_cache, block_tables, context_lens, scale)[0]


def _decode_rows(q, k_cache, v_cache, block_tables, context_lens, scale, lse: bool = False):
    """paged_decode_ref without a shared prefix -> (out [B, Hq, D], its log-sum-exp [B, Hq] fp32 if `lse`)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    lses = q.new_empty(B, Hq, dtype=torch.float32) if lse else None
    lens = context_lens.tolist()
    for a in range(0, B, DECODE_ROWS):
        z = min(a + DECODE_ROWS, B)
        L = max(lens[a:z])
        kp, vp = (_gather(c, block_tables[a:z], L) for c in (k_cache, v_cache))      # [b, Hkv, nb * bs, D]
        if min(lens[a:z]) == L:        # rows of one length (a greedy batch of equal prompts): no mask
            mask, kp, vp = None, kp[:, :, :L], vp[:, :, :L]
        else:
            mask = (torch.arange(kp.shape[2], device=q.device)[None, :] < context_lens[a:z, None])[:, None, None]
        if lse:   # the query heads of one KV head as that head's query rows: [b, Hkv, G, D]; the op returns the lse
            if mask is not None:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[a:z].view(z - a, Hkv, Hq // Hkv, D), kp, vp, attn_mask=mask, scale=scale)
            out[a:z], lses[a:z] = o.reshape(z - a, Hq, D), m.reshape(z - a, Hq)
            continue
        o = F.scaled_dot_product_attention(q[a:z, :, None], kp, vp, attn_mask=mask, scale=scale,
                                           enable_gqa=Hq != Hkv)   # [b, Hq, 1, D]
        out[a:z] = o[:, :, 0]
    return out, lses


def _cascade(q, k_cache, v_cache, block_tables, context_lens, scale, shared):
    """The shared blocks against every row's queries at once (one GEMM per KV head, fp32 scores), the rest
    row by row (_decode_rows), the two softmaxes merged by their log-sum-exps."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    P, G = shared * bs, Hq // Hkv
    ids = block_tables[0, :shared].long()
    kp, vp = (c.index_select(0, ids).view(P, Hkv, D).transpose(0, 1).float() for c in (k_cache, v_cache))
    qf = q.float().view(B, Hkv, G, D).transpose(0, 1).reshape(Hkv, B * G, D)           # [Hkv, B * G, D]
    s = torch.matmul(qf, kp.transpose(1, 2)) * (D ** -0.5 if scale is None else scale)  # [Hkv, B * G, P]
    lse_p = s.logsumexp(-1)
    o_p = torch.matmul(torch.exp(s - lse_p[..., None]), vp)                            # [Hkv, B * G, D]
    o_p, lse_p = o_p.view(Hkv, B, G, D).transpose(0, 1).reshape(B, Hq, D), lse_p.view(Hkv, B, G).transpose(0, 1)
    o_s, lse_s = _decode_rows(q, k_cache, v_cache, block_tables[:, shared:], context_lens - P, scale, lse=True)
    w = torch.sigmoid(lse_p.reshape(B, Hq) - lse_s)[..., None]                         # the prefix's share
    return (o_p * w + o_s.float() * (1 - w)).to(q.dtype)
