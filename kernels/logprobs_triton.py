"""Fused linear -> log-softmax -> gather: Triton row kernels (one program per row of a chunk of logits [c, V],
streaming V in BLOCK_V tiles) in the twin's chunk loop `kernels.logprobs.ChunkedLogprobs`, which runs the GEMMs."""

import functools

import torch
import triton
import triton.language as tl

from selfreward.kernels.logprobs import IGNORE_INDEX, ChunkedLogprobs


@triton.jit
def _lse_fwd(L, stride, V, T, LSE, LOGP, ignore_index, BLOCK_V: tl.constexpr):
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
def _dlogits_bwd(L, stride, V, T, LSE, G, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = L + row.to(tl.int64) * stride
    t = tl.load(T + row)
    lse = tl.load(LSE + row)
    g = tl.load(G + row)            # ignored rows: g 0 (and t 0)
    for start in tl.range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        d = g * ((cols == t).to(tl.float32) - tl.exp(x - lse))
        tl.store(base + cols, d.to(L.dtype.element_ty), mask=mask)


def block_v(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels."""
    BV = min(triton.next_power_of_2(V), 4096 if device.type == "cuda" else 1024)
    return BV, 8 if BV >= 2048 else 4


def _rows(kernel, logits, *args):
    """One program per row of a chunk of logits [c, V]."""
    BV, nw = block_v(logits.shape[1], logits.device)
    kernel[(logits.shape[0],)](logits, logits.stride(0), logits.shape[1], *args, BLOCK_V=BV, num_warps=nw)


def linear_logprobs_triton(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    V = weight.shape[0]
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= V)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"linear_logprobs: target {int(targets[i])} at row {i} is outside [0, {V}) "
                         f"and is not ignore_index {ignore_index}")
    rows = functools.partial(_rows, _lse_fwd), functools.partial(_rows, _dlogits_bwd)
    return ChunkedLogprobs.apply(h, weight, targets.contiguous(), chunk, ignore_index, rows, not h.is_cuda)
