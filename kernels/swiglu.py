"""SwiGLU gate: silu(gate) * up, the middle of the Llama MLP."""

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., I] -> [..., I]"""
    return F.silu(gate) * up
