"""Flash attention in Triton (FlashAttention-2; kernels/README.md, "The ops": the forward, the GQA backward
without atomics, prefixes, flash-attn where it fits); layout and contract: the twin `kernels.attention`.
Programs: forward and dQ per (query tile, sequence, query head), dK/dV per (key tile, sequence, kv head).
lse [Hq, N] fp32; delta = rowsum(O * dO) in torch; P is recomputed from lse, never stored.
"""

import math

import torch
import triton
import triton.language as tl

from selfreward.kernels.attention import prefix_dependents
from selfreward.kernels.ops import importable

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile(P, rows, stride, offs_d, mask):
    """The [rows, D] tile at P (an [N, D] slice: one head of an [N, H, D] tensor), zeros where masked."""
    return tl.load(P + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def seq_tile(CU, sid, t, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Tile t of sequence sid (flash and paged attention): its start, length L, the tile's offsets in the
    sequence, their flat rows, and the head dims."""
    start = tl.load(CU + sid)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return start, tl.load(CU + sid + 1) - start, offs, (start + offs).to(tl.int64), offs_d, offs_d < D


@triton.jit
def _visible(offs_m, offs_n, klen, CAUSAL: tl.constexpr):
    """Which keys offs_n (of a range of klen) the queries offs_m see: causal in their own sequence, all of a prefix."""
    ok = (offs_n < klen)[None, :]
    if CAUSAL:
        ok = (offs_n[None, :] <= offs_m[:, None]) & ok
    return ok


@triton.jit
def _kv(K, V, base, offs_n, klen, skn, svn, offs_d, dmask):
    """The key and value tiles at flat rows base + offs_n (zeros past klen)."""
    cols = (base + offs_n).to(tl.int64)
    mask = (offs_n < klen)[:, None] & dmask[None, :]
    return _tile(K, cols, skn, offs_d, mask), _tile(V, cols, svn, offs_d, mask)


@triton.jit
def _q_rows(Q, DO, LSE, DELTA, rows, rmask, sqn, son, offs_d, dmask):
    """Backward: the query and dO tiles of `rows` (pointers at one head), their base-2 logsumexp and delta."""
    qmask = rmask[:, None] & dmask[None, :]
    lse2 = tl.load(LSE + rows, mask=rmask, other=0.0) * LOG2E
    return _tile(Q, rows, sqn, offs_d, qmask), _tile(DO, rows, son, offs_d, qmask), lse2, \
        tl.load(DELTA + rows, mask=rmask, other=0.0)


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """One tile of the online softmax in base 2: (m_i, l_i, acc) updated with scores s (-inf: hidden) and
    values v. A row that has seen no key yet keeps m_i = -inf and adds nothing."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC: tl.constexpr):
    """Backward of one [M, N] tile: P recomputed from the saved base-2 logsumexp, and dS = P * (dP - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_range(part: tl.constexpr, PRE, sid, start, L, hi):
    """Part 0 of a query tile's keys: its prefix's (flat start, length, loop end); part 1: its own, causal."""
    if part == 0:
        plen = tl.load(PRE + 2 * sid + 1)
        base, klen, hi = tl.load(PRE + 2 * sid), plen, plen
    else:
        base, klen = start, L
    return base, klen, hi


# The kernels: Q, O, DO, DQ (strides sq*, so*; DQ has Q's) and LSE, DELTA [Hq, N] at query head h;
# K, V, DK, DV (strides sk*, sv*; DK, DV have K's, V's) at kv head h // REP.
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, PRE, sm_scale, N, sqn, sqh, skn, skh, svn, svh, son, soh,
              REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    mt, sid, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Q, O, LSE, K, V = Q + h * sqh, O + h * soh, LSE + h * N, K + h // REP * skh, V + h // REP * svh
    start, L, offs_m, rows, offs_d, dmask = seq_tile(CU, sid, mt, BLOCK_M, BLOCK_D, D)
    qmask = (offs_m < L)[:, None] & dmask[None, :]
    q = _tile(Q, rows, sqn, offs_d, qmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    for part in tl.static_range(0 if HAS_PREFIX else 1, 2):
        base, klen, hi = _key_range(part, PRE, sid, start, L, tl.minimum(L, (mt + 1) * BLOCK_M))
        for n0 in tl.range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, v = _kv(K, V, base, offs_n, klen, skn, svn, offs_d, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(_visible(offs_m, offs_n, klen, part == 1), s, float("-inf"))
            m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC)
    acc = acc / l_i[:, None]        # every row sees a key (key 0 of its prefix or its sequence): l_i > 0
    tl.store(O + rows[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU, DEP, sm_scale, N, sqn, sqh, skn, skh, svn, svh, son, soh,
                   REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    nt, sid, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    K, V, DK, DV = K + kvh * skh, V + kvh * svh, DK + kvh * skh, DV + kvh * svh
    start, L, offs_n, cols, offs_d, dmask = seq_tile(CU, sid, nt, BLOCK_N, BLOCK_D, D)
    k, v = _kv(K, V, start, offs_n, L, skn, svn, offs_d, dmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    for hh in tl.static_range(REP):                   # every query head of the group: no atomics
        h = kvh * REP + hh
        for part in tl.static_range(2 if HAS_PREFIX else 1):
            if part == 0:   # the sequence's own queries, from the first tile that can see this key tile
                base, lo, qlen = start, (nt * BLOCK_N // BLOCK_M) * BLOCK_M, L
            else:           # the queries of the sequences this one is the prefix of: they see every key here
                base, lo = tl.load(DEP + 2 * sid), 0
                qlen = tl.load(DEP + 2 * sid + 1) - base
            for m0 in tl.range(lo, qlen, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                rmask = offs_m < qlen
                q, do, lse2, delta = _q_rows(Q + h * sqh, DO + h * soh, LSE + h * N, DELTA + h * N,
                                             (base + offs_m).to(tl.int64), rmask, sqn, son, offs_d, dmask)
                valid = rmask[:, None] & _visible(offs_m, offs_n, L, part == 0)
                p, ds = _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    kvmask = (offs_n < L)[:, None] & dmask[None, :]
    tl.store(DK + cols[:, None] * skn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + cols[:, None] * svn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU, PRE, sm_scale, N, sqn, sqh, skn, skh, svn, svh, son, soh,
                 REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    mt, sid, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Q, DO, DQ, K, V = Q + h * sqh, DO + h * soh, DQ + h * sqh, K + h // REP * skh, V + h // REP * svh
    start, L, offs_m, rows, offs_d, dmask = seq_tile(CU, sid, mt, BLOCK_M, BLOCK_D, D)
    rmask = offs_m < L
    q, do, lse2, delta = _q_rows(Q, DO, LSE + h * N, DELTA + h * N, rows, rmask, sqn, son, offs_d, dmask)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    for part in tl.static_range(0 if HAS_PREFIX else 1, 2):
        base, klen, hi = _key_range(part, PRE, sid, start, L, tl.minimum(L, (mt + 1) * BLOCK_M))
        for n0 in tl.range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, v = _kv(K, V, base, offs_n, klen, skn, svn, offs_d, dmask)
            valid = rmask[:, None] & _visible(offs_m, offs_n, klen, part == 1)
            _, ds = _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + rows[:, None] * sqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def tile_config(cuda: bool, D: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) forward and backward. Interpreter: small tiles."""
    if not cuda:
        return (16, 16, 1, 1), (16, 16, 1, 1)
    return (128, 64, 8, 3 if D <= 64 else 2), (64 if D <= 64 else 32, 64, 8, 2)


def _run(kernel, grid, args, q, k, v, o, tiles, has_prefix):
    """kernel[grid](q, k, v, *args, N, the strides of q, k, v and o (O or dO), the constants of `tiles`)."""
    BM, BN, nw, ns = tiles
    N, Hq, D = q.shape
    if N and grid[1]:   # tokens and sequences
        kernel[grid](q, k, v, *args, N, *(s for t in (q, k, v, o) for s in t.stride()[:2]), REP=Hq // k.shape[1],
                     D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BM, BLOCK_N=BN, HAS_PREFIX=has_prefix,
                     PREC="ieee" if q.dtype == torch.float32 else None, num_warps=nw, num_stages=ns)   # no TF32


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, prefix):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        cu = cu_seqlens.to(torch.int32).contiguous()
        # pre: [S, 2] (start, length) of each sequence's prefix; dep: the queries that read it (without: unused cu)
        pre = cu if prefix is None else prefix.to(device=q.device, dtype=torch.int32).contiguous()
        dep = cu if prefix is None else prefix_dependents(cu, pre).to(q.device)
        N, Hq, S = q.shape[0], q.shape[1], cu.numel() - 1
        o = torch.empty_like(q)
        lse = torch.empty(Hq, N, dtype=torch.float32, device=q.device)
        tiles = tile_config(q.is_cuda, q.shape[2])[0]
        _run(_attn_fwd, (triton.cdiv(max_seqlen, tiles[0]), S, Hq), (o, lse, cu, pre, scale), q, k, v, o, tiles,
             prefix is not None)
        ctx.save_for_backward(q, k, v, o, lse, cu, pre, dep)
        ctx.max_seqlen, ctx.scale, ctx.has_prefix = max_seqlen, scale, prefix is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, pre, dep = ctx.saved_tensors
        q, k, v = (t.contiguous() for t in (q, k, v))   # dQ, dK, dV are written with q's, k's, v's strides
        Hq, S = q.shape[1], cu.numel() - 1
        do = do.contiguous() if do.stride(-1) != 1 or do.stride() != o.stride() else do
        delta = (o.float() * do.float()).sum(-1).T.contiguous()             # [Hq, N]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        tiles = tile_config(q.is_cuda, q.shape[2])[1]
        _run(_attn_bwd_dkdv, (triton.cdiv(ctx.max_seqlen, tiles[1]), S, k.shape[1]),
             (do, lse, delta, dk, dv, cu, dep, ctx.scale), q, k, v, do, tiles, ctx.has_prefix)
        _run(_attn_bwd_dq, (triton.cdiv(ctx.max_seqlen, tiles[0]), S, Hq),
             (do, lse, delta, dq, cu, pre, ctx.scale), q, k, v, do, tiles, ctx.has_prefix)
        return dq, dk, dv, None, None, None, None


def check_args(q: torch.Tensor, Hkv: int, cu_seqlens: torch.Tensor, max_len: int | None, scale: float | None):
    """The GQA head count check, then (max_len, scale) with their defaults: the longest sequence, 1/sqrt(D)."""
    if q.shape[1] % Hkv:
        raise ValueError(f"attention: {q.shape[1]} query heads is not a multiple of {Hkv} kv heads")
    if max_len is None:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return max_len, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, scale: float | None = None,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
    max_seqlen, scale = check_args(q, k.shape[1], cu_seqlens, max_seqlen, scale)
    if prefix is not None and not bool((prefix[:, 1] > 0).any()):
        prefix = None
    if prefix is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype \
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and importable("flash_attn"):
        from flash_attn import flash_attn_varlen_func
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    return _FlashAttn.apply(q, k, v, cu_seqlens, max_seqlen, scale, prefix)
