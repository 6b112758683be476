"""RoPE (rotate-half) in Triton, one program per token (all heads), the backward rotating back (sin negated);
contract: the twin `kernels.rope.rope_ref`, whose rounding of cos/sin to x's dtype this kernel copies."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, COS, SIN, Y, stride_xn, stride_xh, stride_yn, stride_yh, stride_c, nh, half,
                 SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    hb = tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    mask = (heads[:, None] < nh) & dmask[None, :]
    c = tl.load(COS + tok * stride_c + d, mask=dmask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s = tl.load(SIN + tok * stride_c + d, mask=dmask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s = s * SIGN
    p = X + tok * stride_xn + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + half, mask=mask, other=0.0).to(tl.float32)
    q = Y + tok * stride_yn + heads[:, None] * stride_yh + d[None, :]
    tl.store(q, (x1 * c[None, :] - x2 * s[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(q + half, (x2 * c[None, :] + x1 * s[None, :]).to(Y.dtype.element_ty), mask=mask)


def _launch(x, cos, sin, sign):
    N, nh, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(N, nh, D, dtype=x.dtype, device=x.device)
    half = D // 2
    BLOCK_D = triton.next_power_of_2(half)
    BLOCK_H = min(triton.next_power_of_2(nh), max(1, 4096 // BLOCK_D))
    if N:
        _rope_kernel[(N, triton.cdiv(nh, BLOCK_H))](x, cos, sin, y, x.stride(0), x.stride(1), y.stride(0),
                                                    y.stride(1), cos.stride(0), nh, half, SIGN=sign,
                                                    BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, -1.0), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, nh, D]; cos, sin: [N, D/2] -> [N, nh, D] (no gradient to cos/sin: they come from positions)."""
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2] // 2):
        raise ValueError(f"rope_triton: x {tuple(x.shape)} needs cos/sin [N, D/2], got {tuple(cos.shape)}")
    return _Rope.apply(x, cos, sin)
