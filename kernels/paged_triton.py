"""Paged KV cache in Triton (kernels/README.md, "The ops": store, (query, head-in-group) row tiles, split-K);
cache layout and contract: the twin `kernels.paged`. `_paged_attn`: one program per (row tile, sequence, kv
head); query i of a sequence with qlen new tokens sits at ctx - qlen + i (`paged_decode_triton`: qlen = 1).
"""

import torch
import triton
import triton.language as tl

from selfreward.kernels.attention_triton import LOG2E, seq_tile, check_args, softmax_step


@triton.jit
def _store_kv(K, V, KC, VC, SLOT, skn, skh, svn, svh, s_kslot, s_kh, s_vslot, s_vh, Hkv, D,
              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    slot = tl.load(SLOT + tok).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    keep = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0
    mask = (hs < Hkv)[:, None] & (ds < D)[None, :] & keep[:, None]
    k = tl.load(K + tok * skn + hs[:, None] * skh + ds[None, :], mask=mask)
    v = tl.load(V + tok * svn + hs[:, None] * svh + ds[None, :], mask=mask)
    tl.store(KC + slot * s_kslot + hs[:, None] * s_kh + ds[None, :], k, mask=mask)
    tl.store(VC + slot * s_vslot + hs[:, None] * s_vh + ds[None, :], v, mask=mask)


@triton.jit
def _paged_attn(Q, KC, VC, O, LSEP, CUQ, BT, CTX, sm_scale, sqn, sqh, son, soh, s_kb, s_kt, s_kh,
                s_vb, s_vt, s_vh, s_bt, s_ps, s_ls, s_ln, block_size, span, n_splits, REP: tl.constexpr,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, SPLIT: tl.constexpr):
    # SPLIT: this program covers keys [split * span, (split + 1) * span) and writes an fp32 partial O
    # (at O + split * s_ps) and its base-2 logsumexp (LSEP [splits, N, Hq]); torch merges the splits.
    mt, sid = tl.program_id(0), tl.program_id(1)
    kvh = tl.program_id(2) // n_splits
    split = tl.program_id(2) % n_splits
    qs, qlen, r, _, offs_d, dmask = seq_tile(CUQ, sid, mt, BLOCK_M, BLOCK_D, D)   # r: (query, head-in-group)
    ctx = tl.load(CTX + sid)
    qi = r // REP
    head = kvh * REP + r % REP
    rmask = qi < qlen
    qpos = ctx - qlen + qi
    qrow = (qs + qi).to(tl.int64)
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + qrow[:, None] * sqn + head[:, None] * sqh + offs_d[None, :], mask=qmask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    last_q = tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // REP, qlen - 1)
    lo = split * span
    hi = tl.minimum(tl.minimum(ctx, ctx - qlen + last_q + 1), lo + span)
    for n0 in tl.range(lo, hi, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tmask = tok < ctx
        blk = tl.load(BT + sid * s_bt + tok // block_size, mask=tmask, other=0).to(tl.int64)
        off = (tok % block_size).to(tl.int64)
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(KC + (blk * s_kb + off * s_kt + kvh * s_kh)[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        v = tl.load(VC + (blk * s_vb + off * s_vt + kvh * s_vh)[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where((tok[None, :] <= qpos[:, None]) & tmask[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC)   # a row may see no key yet (splits)
    has = l_i > 0                   # a split may hold no visible key: weight 0 (lse -inf), output 0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSEP + split * s_ls + qrow * s_ln + head, lse2, mask=rmask)
    o = O + split * s_ps + qrow[:, None] * son + head[:, None] * soh + offs_d[None, :]
    tl.store(o, acc.to(O.dtype.element_ty), mask=qmask)


def _check_cache(k_cache: torch.Tensor, name: str = "k_cache") -> None:
    if k_cache.dim() != 4 or k_cache.stride(-1) != 1 or k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError(f"paged_triton: {name} must be [num_blocks, block_size, Hkv, D] with contiguous "
                         f"blocks and last dim, got shape {tuple(k_cache.shape)} strides {k_cache.stride()}")


def tile_config(cuda: bool, max_qlen: int, rep: int, D: int = 128) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of `_paged_attn`: a tile of >= 16 (query, head) rows for tl.dot.
    8 warps at head dim 128 keep the sm_90 build free of register spills (tests/compile_kernels.py)."""
    BM = max(16, min(64 if cuda else 16, triton.next_power_of_2(max_qlen * rep)))
    return BM, (64 if cuda else 16), (8 if D > 64 else 4)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    _check_cache(k_cache), _check_cache(v_cache, "v_cache")
    N, Hkv, D = k.shape
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    if N:
        _store_kv[(N,)](k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1), v.stride(0),
                        v.stride(1), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
                        Hkv, D, BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D))


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float | None = None, max_qlen: int | None = None,
                         num_splits: int | None = None) -> torch.Tensor:
    """q: [N, Hq, D], each sequence's newest tokens (already stored) -> [N, Hq, D]. See module doc.
    num_splits: split each sequence's keys into that many ranges run in parallel and merged by their
    logsumexp (None: automatic, only on CUDA when the grid is smaller than the GPU)."""
    _check_cache(k_cache), _check_cache(v_cache, "v_cache")
    N, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    rep = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    cu, bt, ctx = (t.to(torch.int32).contiguous() for t in (cu_seqlens_q, block_tables, context_lens))
    S = cu.numel() - 1
    max_qlen, scale = check_args(q, Hkv, cu, max_qlen, scale)
    BM, BN, nw = tile_config(q.is_cuda, max_qlen, rep, D)
    m_tiles = triton.cdiv(max_qlen * rep, BM)
    max_ctx_bound = bt.shape[1] * bs                     # no device sync: the table's width bounds ctx
    P = num_splits
    if P is None:                   # split only when the grid leaves SMs idle, into ranges of >= 512 keys
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        programs = m_tiles * S * Hkv
        P = 1 if programs >= sms else max(1, min(triton.cdiv(sms, programs), triton.cdiv(max_ctx_bound, 512), 16))
    span = triton.cdiv(triton.cdiv(max_ctx_bound, P), BN) * BN
    o = torch.empty(P, N, Hq, D, dtype=torch.float32 if P > 1 else q.dtype, device=q.device)   # [1, ...]: no split
    lse = torch.empty(P if P > 1 else 0, N, Hq, dtype=torch.float32, device=q.device)
    if N and S:
        _paged_attn[(m_tiles, S, Hkv * P)](
            q, k_cache, v_cache, o, lse, cu, bt, ctx, scale, q.stride(0), q.stride(1), o.stride(1), o.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), bt.stride(0), o.stride(0), lse.stride(0), lse.stride(1), bs, span, P, REP=rep, D=D,
            BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BM, BLOCK_N=BN,
            PREC="ieee" if q.dtype == torch.float32 else None, SPLIT=P > 1, num_warps=nw)
    if P == 1:
        return o[0]
    w = torch.exp2(lse - lse.amax(0, keepdim=True))       # [P, N, Hq]; split 0 always sees key 0
    return ((w[..., None] * o).sum(0) / w.sum(0)[..., None]).to(q.dtype)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        scale: float | None = None, num_splits: int | None = None, shared: int = 0) -> torch.Tensor:
    """`shared` (the twin's cascade hint) is not used: each program reads its row's blocks in place."""
    cu = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_prefill_triton(q, k_cache, v_cache, cu, block_tables, context_lens, scale, max_qlen=1,
                                num_splits=num_splits)
