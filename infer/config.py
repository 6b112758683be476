"""The engine's settings and the one function every caller loads an engine with.

    eng = load_engine("ckpt/", EngineConfig())                  # CUDA + bf16 where available, else CPU fp32
    eng = load_engine("ckpt/", EngineConfig(device="cpu", dtype="bfloat16"))
    eng.tokenizer                                                # the checkpoint's tokenizer, loaded once

Under torchrun the default device is cuda:LOCAL_RANK, so each rank samples on its own GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from selfreward.cli import passive
from selfreward.records import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    device: str = passive("")                  # "" = cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = ""                   # float32 | bfloat16 | float16; "" = bfloat16 on CUDA, float32 on CPU
    block_size: int = passive(16)              # tokens per KV block
    num_blocks: int = passive(0)               # KV blocks in the pool; 0 = enough for max_num_seqs (memory-capped)
    max_num_seqs: int = passive(256)           # sequences decoded together
    max_num_batched_tokens: int = passive(4096)   # tokens per engine step (prefill chunks + decodes)
    prefix_cache: bool = passive(True)         # share KV blocks of equal prefixes (judge rubric, few-shot header)
    tensor_parallel: int = passive(1)          # ranks per engine replica (infer/parallel.py); > 1 needs torchrun
    cuda_graphs: bool = False         # decode from CUDA graphs per batch-size bucket (CUDA only; untested)

    def check(self) -> None:
        """A bad setting is a DataError (a ValueError) naming it: `error: ...`, exit 2, from every entry point."""
        if self.dtype and self.dtype not in DTYPES:
            raise DataError(f"engine dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise DataError(f"engine {name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise DataError(f"engine num_blocks must be >= 0, got {self.num_blocks}")


def add_engine_flags(p) -> set[str]:
    """--engine-device, --engine-dtype, ... (every EngineConfig field but tensor_parallel) on argparse parser
    `p`, for a command that takes no config dataclass of its own -> the dests, for `engine_from_flags`."""
    from selfreward import cli
    return cli.add_flags(p, EngineConfig, prefix="engine.", skip={"": {"tensor_parallel"}})


def engine_from_flags(ns, dests: set[str]) -> EngineConfig:
    """The EngineConfig the parsed flags give (defaults for those not given), checked."""
    from selfreward import cli
    cfg = cli.from_dict(EngineConfig, {k.split(".", 1)[1]: getattr(ns, k) for k in dests
                                       if getattr(ns, k) is not None}, "flags")
    cfg.check()
    return cfg


def resolve_device(cfg: EngineConfig) -> tuple[str, torch.dtype]:
    """(device, dtype) the engine runs with: the configured ones, else CUDA/bf16 where available."""
    cfg.check()
    cuda = torch.cuda.is_available()
    device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if cfg.cuda_graphs and not device.startswith("cuda"):
        raise DataError(f"engine cuda_graphs needs a CUDA device; the engine's device is {device}")
    return device, DTYPES[dtype]


def load_engine(path, cfg: EngineConfig | None = None):
    """The Engine for checkpoint `path` on the configured device, with the checkpoint's own tokenizer; with
    tensor_parallel T > 1, this rank's shard of a T-way replica (every rank of the replica calls this)."""
    from selfreward.infer.engine import Engine
    cfg = cfg or EngineConfig()
    if cfg.tensor_parallel > 1:
        from selfreward.infer.parallel import init_tp, load_engine_tp
        return load_engine_tp(path, cfg, init_tp(cfg.tensor_parallel))
    device, dtype = resolve_device(cfg)
    return Engine.from_pretrained(path, dtype=dtype, device=device, block_size=cfg.block_size,
                                  num_blocks=cfg.num_blocks or None, max_num_seqs=cfg.max_num_seqs,
                                  max_num_batched_tokens=cfg.max_num_batched_tokens,
                                  prefix_cache=cfg.prefix_cache, cuda_graphs=cfg.cuda_graphs)
