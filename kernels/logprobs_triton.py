"""Fused linear -> log-softmax -> gather with Triton row kernels, chunked over tokens.

Same algorithm as the twin `kernels.logprobs.linear_logprobs_ref`: tokens go through in chunks of
`chunk` rows, so at most one [chunk, V] logits buffer exists at a time.

- forward, per chunk: logits = h_c @ W.T (the GEMM stays with cuBLAS / torch), then `_lse_fwd`
  streams each row once over V in BLOCK_V tiles with an online max / sum-exp and returns the row's
  logsumexp and target log-prob. Only lse [N] is kept for the backward.
- backward, per chunk: the logits are recomputed and `_dlogits_bwd` overwrites them in place with
  d logits = g * (onehot(t) - exp(logits - lse)); then dh_c = dlogits @ W and dW += dlogits.T @ h_c.
  No second [chunk, V] buffer is allocated.

Targets equal to ignore_index give log-prob 0 and no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_fwd(L, T, LSE, LOGP, stride, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = L + row.to(tl.int64) * stride
    t = tl.load(T + row)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in tl.range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = t != ignore_index
    picked = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOGP + row, tl.where(valid, picked - lse, 0.0))


@triton.jit
def _dlogits_bwd(L, T, LSE, G, stride, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = L + row.to(tl.int64) * stride
    t = tl.load(T + row)
    lse = tl.load(LSE + row)
    g = tl.load(G + row)            # already 0 on ignored rows
    for start in tl.range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        d = g * ((cols == t).to(tl.float32) - tl.exp(x - lse))
        tl.store(base + cols, d.to(L.dtype.element_ty), mask=mask)


def _block_v(V: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(V), 4096 if device.type == "cuda" else 1024)


def _chunk_logits(hc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = hc @ weight.T                                     # [c, V]
    # off CUDA (the interpreter) keep fp32 logits as the twin does; on CUDA keep the GEMM's dtype and let
    # the kernels upcast per tile, which halves the chunk buffer for bf16
    return logits if hc.is_cuda else logits.float()


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        N, V = h.shape[0], weight.shape[0]
        targets = targets.contiguous()
        logp = torch.zeros(N, dtype=torch.float32, device=h.device)
        lse = torch.zeros(N, dtype=torch.float32, device=h.device)
        BV = _block_v(V, h.device)
        for s in range(0, N, chunk):
            logits = _chunk_logits(h[s:s + chunk], weight)
            c = logits.shape[0]
            _lse_fwd[(c,)](logits, targets[s:], lse[s:], logp[s:], logits.stride(0), V, ignore_index,
                           BLOCK_V=BV, num_warps=8 if BV >= 2048 else 4)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return logp

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, lse = ctx.saved_tensors
        chunk, V = ctx.chunk, weight.shape[0]
        g = torch.where(targets != ctx.ignore_index, g.float(), 0.0).contiguous()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        BV = _block_v(V, h.device)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            dl = _chunk_logits(hc, weight)                         # overwritten in place with d logits
            _dlogits_bwd[(dl.shape[0],)](dl, targets[s:], lse[s:], g[s:], dl.stride(0), V,
                                         BLOCK_V=BV, num_warps=8 if BV >= 2048 else 4)
            if need_h:
                dh[s:s + chunk] = (dl.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                if dl.dtype == torch.float32:
                    dw.addmm_(dl.T, hc.float())
                else:                                              # bf16/fp16 GEMM, fp32 accumulator
                    dw += dl.T @ hc.to(dl.dtype)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def linear_logprobs_triton(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """h: [N, H]; weight: [V, H]; targets: [N] -> per-token log-probs [N] fp32 (0 where ignored)."""
    V = weight.shape[0]
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= V)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"linear_logprobs: target {int(targets[i])} at row {i} is outside [0, {V}) "
                         f"and is not ignore_index {ignore_index}")
    return _FusedLinearLogprobs.apply(h, weight, targets, chunk, ignore_index)
