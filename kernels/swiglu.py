"""SwiGLU gate: silu(gate) * up, the middle of the Llama MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I] -> [..., I]"""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from selfreward.kernels.ops import use_triton
    if use_triton(gate):
        from selfreward.kernels.swiglu_triton import swiglu_triton
        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)
