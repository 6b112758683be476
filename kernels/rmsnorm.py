"""RMSNorm, optionally fused with the residual add that precedes it.

    y = w * x / sqrt(mean(x^2) + eps)          (statistics in fp32, as transformers' Llama does)
"""

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None):
    """x, residual: [..., H]; weight: [H]. Returns y, or (y, x + residual) when residual is given."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(x.dtype)
    return y if residual is None else (y, x)
