"""Rotary position embedding in the rotate-half layout transformers' Llama uses, from per-token cos/sin tables
(kernels/README.md, "The ops": positions restart in packed rows; llama3 scaling is in the model's frequencies)."""

import torch


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """inv_freq: [D/2] fp32; positions: [N] int -> cos, sin: [N, D/2] fp32."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    return freqs.cos(), freqs.sin()


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, nh, D]; cos, sin: [N, D/2] -> [N, nh, D]. out = x*cos + rotate_half(x)*sin."""
    d = x.shape[-1] // 2
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
