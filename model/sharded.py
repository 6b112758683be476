"""Sharded reading of a Hugging Face checkpoint: each rank reads only its slices of each tensor.

The same name table and checks as `model.checkpoint.load_model` (unexpected / missing tensors, shapes
against config.json, tokenizer fits the embedding), but a tensor is read with safetensors'
`get_slice(...)[rows or columns]`, which copies only the requested range out of the memory-mapped file:
a 70B checkpoint never materialises whole on one rank. Which slice a rank takes is the caller's plan
(infer/parallel.py: tensor-parallel shards); tensors absent from the plan are read whole.
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfreward.model.checkpoint import CheckpointError, _tensor_files, check_no_unexpected, check_tokenizer_fits, \
    each_tensor, name_table
from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer

Slice = tuple[int, int, int]   # (dim, start, stop) of the full tensor


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> its unsharded shape (from a model on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(p.shape) for k, p in Transformer(cfg).named_parameters()}


def read_sharded(path: str | Path, cfg: ModelConfig, plan: dict[str, Slice],
                 dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """-> (our name -> this rank's slice of the tensor, cast to dtype; bytes read from the files)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    check_tokenizer_fits(path, cfg)
    files = _tensor_files(path)
    table = name_table(cfg)
    shapes = full_shapes(cfg)
    check_no_unexpected(files, table, cfg)
    state: dict[str, torch.Tensor] = {}
    nbytes = 0
    for ours, hf, f, handle in each_tensor(path, files, table):
        sl = handle.get_slice(hf)
        shape = tuple(sl.get_shape())
        if shape != shapes[ours]:
            raise CheckpointError(f"{f}: tensor '{hf}' has shape {shape}, config says {shapes[ours]}")
        if ours in plan:
            dim, a, b = plan[ours]
            t = sl[(slice(None),) * dim + (slice(a, b),)]
        else:
            t = sl[:]
        nbytes += t.numel() * t.element_size()
        state[ours] = t.to(dtype)
    return state, nbytes
