"""SwiGLU gate: silu(gate) * up, the middle of the Llama MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I] -> [..., I]"""
    return F.silu(gate) * up
