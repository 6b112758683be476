"""Residual dropout with a mask that is cheap to draw on the CPU (train/README.md, "The fused head, ...": why,
and its timings): 16 random bits per element, four per 64-bit draw; backward replays nothing (train/parallel.py
saves `randint`'s output; `where` saves the boolean mask). p is rounded to a multiple of 1/65536 and the kept
values scaled by 1 / (1 - that p): E[dropout(x)] = x exactly. CUDA keeps `F.dropout`. The RNG is torch's default
generator (manual_seed, checkpoint RNG replay, resume).
"""

import math

import torch
import torch.nn.functional as F

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """-> (bool mask of `shape`, True = kept; p_q): each element dropped with probability p_q (p rounded)."""
    n = math.prod(shape)
    drop_levels = round(p * _LEVELS)
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = bits.view(torch.int16)[:n].view(shape)            # uniform on [-32768, 32767]
    return lanes >= drop_levels - (_LEVELS // 2), drop_levels / _LEVELS


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x: any shape -> the same shape; the identity unless training and p > 0."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep, p_q = keep_mask(x.shape, p, x.device)
    if p_q >= 1.0:
        return torch.zeros_like(x)
    return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p_q))
