"""The kernel switch: `import selfreward.kernels.ops as K` gives every op (`K.rmsnorm`, `K.attention`, ...):
its Triton version, imported only when `use_triton` asks for it, else its twin (kernels/README.md, "The switch").
"""

import functools
import importlib
import os

import torch

from selfreward.kernels.attention import attention_ref
from selfreward.kernels.logprobs import linear_logprobs_ref
from selfreward.kernels.paged import paged_decode_ref, paged_prefill_ref, store_kv_ref
from selfreward.kernels.rmsnorm import rmsnorm_ref
from selfreward.kernels.rope import rope_cos_sin, rope_ref
from selfreward.kernels.swiglu import swiglu_ref


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether an optional module (triton, flash_attn) imports here."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("SRLM_KERNELS", "auto")
    if mode == "ref":
        return False
    if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return importable("triton.language")
    if mode == "triton":   # Triton cannot run CPU tensors without its interpreter: say so, don't crash deep inside
        raise RuntimeError("SRLM_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
                           "before the process starts (triton reads it at import)")
    return False


def _switch(ref):
    """The op: `ref`'s Triton version where `use_triton(first argument)`, else `ref` (same arguments)."""
    module, name = ref.__module__ + "_triton", ref.__name__.removesuffix("_ref") + "_triton"

    def op(*args, **kwargs):
        if use_triton(args[0]):
            return getattr(importlib.import_module(module), name)(*args, **kwargs)
        return ref(*args, **kwargs)
    op.__name__, op.__doc__ = ref.__name__.removesuffix("_ref"), ref.__doc__
    return op


rmsnorm, rope, swiglu = _switch(rmsnorm_ref), _switch(rope_ref), _switch(swiglu_ref)
attention, linear_logprobs = _switch(attention_ref), _switch(linear_logprobs_ref)
store_kv, paged_decode, paged_prefill = _switch(store_kv_ref), _switch(paged_decode_ref), _switch(paged_prefill_ref)
