"""RMSNorm (optionally fused with the residual add) in Triton; numerics as the twin `kernels.rmsnorm`.
One program per row (all of it in registers); the backward: kernels/README.md, "The ops"."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, H, eps,
                 HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)   # rounded as the twin's x + r
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    n = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(DY, DS, X, W, RSTD, DX, DWP, M, H, stride_dy, stride_ds, stride_x, stride_dx,
                 HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in tl.range(pid, M, G):
        xf = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = xf * rstd
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / H))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DWP + pid * H + cols, dw, mask=mask)


def num_warps(BLOCK: int) -> int:
    return 4 if BLOCK <= 4096 else 8


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        r2 = residual.reshape(-1, H).contiguous() if residual is not None else x2    # x2: an unused pointer
        M, weight = x2.shape[0], weight.contiguous()
        y = torch.empty(M, H, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        s = torch.empty_like(x2) if residual is not None else x2                      # x + residual
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BLOCK = triton.next_power_of_2(H)
        if M:
            _rmsnorm_fwd[(M,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), H,
                               eps, HAS_RES=residual is not None, BLOCK=BLOCK, num_warps=num_warps(BLOCK))
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_res = residual is not None
        return y.view(x.shape) if residual is None else (y.view(x.shape), s.view(x.shape))

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, rstd = ctx.saved_tensors
        M, H = s.shape
        dy2 = dy.reshape(-1, H).contiguous()
        ds2 = ds.reshape(-1, H).contiguous() if ds is not None else dy2               # dy2: an unused pointer
        dx = torch.empty_like(s)
        sms = torch.cuda.get_device_properties(s.device).multi_processor_count if s.is_cuda else 1
        G = max(1, min(M, 4 * sms))   # stripes of rows; the interpreter: few programs, each looping over rows
        dwp = torch.zeros(G, H, dtype=torch.float32, device=s.device)
        BLOCK = triton.next_power_of_2(H)
        if M:
            _rmsnorm_bwd[(G,)](dy2, ds2, s, weight, rstd, dx, dwp, M, H, dy2.stride(0), ds2.stride(0), s.stride(0),
                               dx.stride(0), HAS_DS=ds is not None, BLOCK=BLOCK, num_warps=num_warps(BLOCK))
        dx = dx.view(dy.shape)
        return dx, dwp.sum(0).to(weight.dtype), None, (dx if ctx.has_res else None)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return _RMSNorm.apply(x, weight, eps, residual)
