"""Flash attention in Triton: causal, grouped-query, packed variable-length sequences (cu_seqlens).

Layout as the twin `kernels.attention.attention_ref`: q [N, Hq, D], k, v [N, Hkv, D], sequences laid
end to end and delimited by cu_seqlens [S+1]. Query head h reads kv head h // (Hq // Hkv).

- forward (FlashAttention-2 style): one program per (query tile, sequence, query head); it streams the
  key/value tiles up to the causal diagonal, keeps a running max / sum-exp in base 2, and writes O and
  the row logsumexp (lse, [Hq, N] fp32) for the backward.
- backward: delta = rowsum(O * dO) (torch), then two kernels: one program per (key tile, sequence,
  kv head) accumulates dK, dV over every query head of its group (so GQA needs no atomics), and one per
  (query tile, sequence, query head) accumulates dQ. P is recomputed from lse, never stored.
- prefixes (shared-prompt DPO): a sequence's query tiles first stream its prefix's key tiles unmasked;
  a prefix sequence's dK/dV program then also loops over the (adjacent) query rows of the sequences that
  read it, unmasked. With prefixes, flash-attn is not used (it has no such layout).

On CUDA with flash-attn installed and fp16/bf16 inputs, `flash_attn_varlen_func` is used instead
(imported lazily). fp32 dots ask for IEEE precision (no TF32), so fp32 results match the twin closely.
GPU paths are untested here (no GPU); the interpreter runs the kernels on CPU in the tests.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from selfreward.kernels.attention import prefix_dependents

LOG2E = 1.4426950408889634


@triton.jit
def _tile(P, rows, stride_n, head, stride_h, offs_d, mask):
    """The [rows, D] tile of an [N, H, D] tensor at one head (zeros where masked)."""
    return tl.load(P + rows[:, None] * stride_n + head * stride_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC: tl.constexpr):
    """Backward of one [M, N] tile: P recomputed from the saved base-2 logsumexp, and dS = P * (dP - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _fwd_step(q, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d, valid, m_i, l_i, acc, qk_scale,
              PREC: tl.constexpr):
    """One key tile of the online softmax: (m_i, l_i, acc) updated with the keys at `cols` where `valid`."""
    k = _tile(K, cols, skn, kvh, skh, offs_d, kvmask)
    v = _tile(V, cols, svn, kvh, svh, offs_d, kvmask)
    s = tl.where(valid, tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _dq_step(q, do, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d, lse2, delta, valid, dq, qk_scale,
             PREC: tl.constexpr):
    """One key tile of dQ: dq + dS @ K for the keys at `cols` where `valid`."""
    k = _tile(K, cols, skn, kvh, skh, offs_d, kvmask)
    v = _tile(V, cols, svn, kvh, svh, offs_d, kvmask)
    _, ds = _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, PRE, sm_scale, N, sqn, sqh, skn, skh, svn, svh, son, soh,
              REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    mt, sid, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = h // REP
    start = tl.load(CU + sid)
    L = tl.load(CU + sid + 1) - start
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = (start + offs_m).to(tl.int64)
    qmask = (offs_m < L)[:, None] & dmask[None, :]
    q = _tile(Q, rows, sqn, h, sqh, offs_d, qmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_PREFIX:   # the prefix's keys first, all visible (every row sees its key 0: no -inf rows)
        pst = tl.load(PRE + 2 * sid)
        plen = tl.load(PRE + 2 * sid + 1)
        for n0 in tl.range(0, plen, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            cols = (pst + offs_n).to(tl.int64)
            kvmask = (offs_n < plen)[:, None] & dmask[None, :]
            m_i, l_i, acc = _fwd_step(q, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d,
                                      (offs_n < plen)[None, :], m_i, l_i, acc, qk_scale, PREC)
    hi = tl.minimum(L, (mt + 1) * BLOCK_M)
    for n0 in tl.range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = (start + offs_n).to(tl.int64)
        kvmask = (offs_n < L)[:, None] & dmask[None, :]
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < L)   # every row sees key 0: finite max
        m_i, l_i, acc = _fwd_step(q, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d, valid, m_i, l_i, acc,
                                  qk_scale, PREC)
    acc = acc / l_i[:, None]
    tl.store(O + rows[:, None] * son + h * soh + offs_d[None, :], acc.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + h * N + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU, DEP, sm_scale, N, sqn, sqh, skn, skh, svn, svh,
                   son, soh, REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                   HAS_PREFIX: tl.constexpr):
    # DO has the strides (son, soh); DK / DV the strides of K / V
    nt, sid, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + sid)
    L = tl.load(CU + sid + 1) - start
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cols = (start + offs_n).to(tl.int64)
    kvmask = (offs_n < L)[:, None] & dmask[None, :]
    k = _tile(K, cols, skn, kvh, skh, offs_d, kvmask)
    v = _tile(V, cols, svn, kvh, svh, offs_d, kvmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = (nt * BLOCK_N // BLOCK_M) * BLOCK_M          # first query tile that can see this key tile
    for hh in tl.static_range(REP):                   # every query head of the group: no atomics
        h = kvh * REP + hh
        for m0 in tl.range(lo, L, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows = (start + offs_m).to(tl.int64)
            rmask = offs_m < L
            qmask = rmask[:, None] & dmask[None, :]
            q = _tile(Q, rows, sqn, h, sqh, offs_d, qmask)
            do = _tile(DO, rows, son, h, soh, offs_d, qmask)
            lse2 = tl.load(LSE + h * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + h * N + rows, mask=rmask, other=0.0)
            valid = (offs_n[None, :] <= offs_m[:, None]) & rmask[:, None] & (offs_n[None, :] < L)
            p, ds = _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if HAS_PREFIX:   # the queries of the sequences this one is the prefix of: they see every key here
            d0 = tl.load(DEP + 2 * sid)
            d1 = tl.load(DEP + 2 * sid + 1)
            for r0 in tl.range(d0, d1, BLOCK_M):
                rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                rmask = rows < d1
                qmask = rmask[:, None] & dmask[None, :]
                q = _tile(Q, rows, sqn, h, sqh, offs_d, qmask)
                do = _tile(DO, rows, son, h, soh, offs_d, qmask)
                lse2 = tl.load(LSE + h * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + h * N + rows, mask=rmask, other=0.0)
                valid = rmask[:, None] & (offs_n[None, :] < L)
                p, ds = _bwd_p_ds(q, k, v, do, lse2, delta, valid, qk_scale, PREC)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + cols[:, None] * skn + kvh * skh + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kvmask)
    tl.store(DV + cols[:, None] * svn + kvh * svh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU, PRE, sm_scale, N, sqn, sqh, skn, skh, svn, svh, son, soh,
                 REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREC: tl.constexpr, HAS_PREFIX: tl.constexpr):
    # DQ has the strides of Q
    mt, sid, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = h // REP
    start = tl.load(CU + sid)
    L = tl.load(CU + sid + 1) - start
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = (start + offs_m).to(tl.int64)
    rmask = offs_m < L
    qmask = rmask[:, None] & dmask[None, :]
    q = _tile(Q, rows, sqn, h, sqh, offs_d, qmask)
    do = _tile(DO, rows, son, h, soh, offs_d, qmask)
    lse2 = tl.load(LSE + h * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * N + rows, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_PREFIX:
        pst = tl.load(PRE + 2 * sid)
        plen = tl.load(PRE + 2 * sid + 1)
        for n0 in tl.range(0, plen, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            cols = (pst + offs_n).to(tl.int64)
            kvmask = (offs_n < plen)[:, None] & dmask[None, :]
            valid = rmask[:, None] & (offs_n < plen)[None, :]
            dq = _dq_step(q, do, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d, lse2, delta, valid, dq,
                          qk_scale, PREC)
    hi = tl.minimum(L, (mt + 1) * BLOCK_M)
    for n0 in tl.range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = (start + offs_n).to(tl.int64)
        kvmask = (offs_n < L)[:, None] & dmask[None, :]
        valid = (offs_n[None, :] <= offs_m[:, None]) & rmask[:, None] & (offs_n[None, :] < L)
        dq = _dq_step(q, do, K, V, cols, kvmask, kvh, skn, skh, svn, svh, offs_d, lse2, delta, valid, dq,
                      qk_scale, PREC)
    tl.store(DQ + rows[:, None] * sqn + h * sqh + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qmask)


def tile_config(cuda: bool, D: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) forward and backward. Interpreter: small tiles."""
    if not cuda:
        return (16, 16, 1, 1), (16, 16, 1, 1)
    fwd = (128, 64, 8, 3 if D <= 64 else 2)
    bwd = (64, 64, 8, 2) if D <= 64 else (32, 64, 8, 2)
    return fwd, bwd


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, prefix):
        N, Hq, D = q.shape
        Hkv = k.shape[1]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        cu = cu_seqlens.to(torch.int32).contiguous()
        has_prefix = prefix is not None
        if has_prefix:   # pre: [S, 2] (start, length) of each sequence's prefix; dep: the queries reading it
            pre = prefix.to(device=q.device, dtype=torch.int32).contiguous()
            dep = prefix_dependents(cu, pre).to(q.device)
        else:
            pre = dep = cu          # unused pointers
        S = cu.numel() - 1
        o = torch.empty_like(q)
        lse = torch.empty(Hq, N, dtype=torch.float32, device=q.device)
        (BM, BN, nw, ns), _ = tile_config(q.is_cuda, D)
        BD, prec = triton.next_power_of_2(D), "ieee" if q.dtype == torch.float32 else None   # fp32: no TF32
        if N and S:
            grid = (triton.cdiv(max_seqlen, BM), S, Hq)
            _attn_fwd[grid](q, k, v, o, lse, cu, pre, scale, N, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), o.stride(0), o.stride(1), REP=Hq // Hkv, D=D, BLOCK_D=BD,
                            BLOCK_M=BM, BLOCK_N=BN, PREC=prec, HAS_PREFIX=has_prefix,
                            num_warps=nw, num_stages=ns)
        ctx.save_for_backward(q, k, v, o, lse, cu, pre, dep)
        ctx.max_seqlen, ctx.scale, ctx.has_prefix = max_seqlen, scale, has_prefix
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, pre, dep = ctx.saved_tensors
        N, Hq, D = q.shape
        Hkv = k.shape[1]
        S = cu.numel() - 1
        do = do.contiguous() if do.stride(-1) != 1 or do.stride() != o.stride() else do
        delta = (o.float() * do.float()).sum(-1).T.contiguous()             # [Hq, N]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _, (BM, BN, nw, ns) = tile_config(q.is_cuda, D)
        BD, prec = triton.next_power_of_2(D), "ieee" if q.dtype == torch.float32 else None   # fp32: no TF32
        common = dict(REP=Hq // Hkv, D=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN, PREC=prec,
                      HAS_PREFIX=ctx.has_prefix, num_warps=nw, num_stages=ns)
        if N and S:
            strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       do.stride(0), do.stride(1))
            _attn_bwd_dkdv[(triton.cdiv(ctx.max_seqlen, BN), S, Hkv)](
                q, k, v, do, lse, delta, dk, dv, cu, dep, ctx.scale, N, *strides, **common)
            _attn_bwd_dq[(triton.cdiv(ctx.max_seqlen, BM), S, Hq)](
                q, k, v, do, lse, delta, dq, cu, pre, ctx.scale, N, *strides, **common)
        return dq, dk, dv, None, None, None, None


def _flash_attn_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256 \
            or q.shape[-1] % 8 or k.dtype != q.dtype:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, scale: float | None = None,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, Hq, D]; k, v: [N, Hkv, D]; cu_seqlens: [S+1]; prefix: [S, 2] (start, length) or None
    -> [N, Hq, D], causal within each sequence, after its prefix's keys (kernels/attention.py)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if prefix is not None and not bool((prefix[:, 1] > 0).any()):
        prefix = None
    if prefix is None and _flash_attn_fits(q, k):
        from flash_attn import flash_attn_varlen_func
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    return _FlashAttn.apply(q, k, v, cu_seqlens, max_seqlen, scale, prefix)
