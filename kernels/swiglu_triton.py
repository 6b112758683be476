"""SwiGLU, silu(gate) * up, in Triton (twin: `kernels.swiglu.swiglu_ref`): one elementwise forward and
one backward kernel, fp32 math."""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)   # the twin rounds silu first
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


def _elementwise(kernel, *ts):
    """kernel over the flat tensors ts (inputs, then outputs) in BLOCK-sized programs."""
    n = ts[0].numel()
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*ts, n, BLOCK=BLOCK)
    return ts


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _elementwise(_swiglu_fwd, gate, up, torch.empty_like(gate))[-1]

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _elementwise(_swiglu_bwd, gate, up, dy.contiguous(), torch.empty_like(gate), torch.empty_like(up))[-2:]


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu_triton: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must match")
    return _SwiGLU.apply(gate, up)
