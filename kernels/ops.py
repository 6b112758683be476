"""The kernel switch: every math op the model, sampler and trainers use, in one place.

Each op lives in its own file as a Triton kernel (where written) beside a plain-PyTorch twin named
`<op>_ref`. `use_triton(t)` picks the implementation per call:

- CUDA tensor                  -> Triton (if triton imports), else the twin;
- CPU tensor, TRITON_INTERPRET=1 -> Triton under the interpreter (how the tests run the kernels);
- CPU tensor otherwise         -> the twin;
- SRLM_KERNELS=ref             -> the twin everywhere (debugging, bisecting a mismatch);
- SRLM_KERNELS=triton          -> on a CPU tensor without TRITON_INTERPRET=1: a clear error.

Triton is imported lazily and only when one of the above asks for it, so CPU paths (and macOS, where
Triton does not install) never touch it.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("SRLM_KERNELS", "auto")
    if mode == "ref":
        return False
    if t.is_cuda:
        return triton_available()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton_available()
    if mode == "triton":   # Triton cannot run CPU tensors without its interpreter: say so, don't crash deep inside
        raise RuntimeError("SRLM_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
                           "before the process starts (triton reads it at import)")
    return False


from selfreward.kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402
from selfreward.kernels.rope import rope, rope_ref, rope_cos_sin  # noqa: E402
from selfreward.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402
from selfreward.kernels.attention import attention, attention_ref  # noqa: E402
from selfreward.kernels.logprobs import linear_cross_entropy, linear_logprobs, linear_logprobs_ref  # noqa: E402
from selfreward.kernels.paged import (  # noqa: E402
    store_kv, store_kv_ref, paged_decode, paged_decode_ref, paged_prefill, paged_prefill_ref,
)

__all__ = [
    "use_triton", "triton_available",
    "rmsnorm", "rmsnorm_ref", "rope", "rope_ref", "rope_cos_sin", "swiglu", "swiglu_ref",
    "attention", "attention_ref", "linear_logprobs", "linear_logprobs_ref", "linear_cross_entropy",
    "store_kv", "store_kv_ref", "paged_decode", "paged_decode_ref", "paged_prefill", "paged_prefill_ref",
]
