"""The engine's settings, the one factory every caller loads an engine with, and the interface an engine
backend implements (EngineAPI).

    eng = load_engine("ckpt/", EngineConfig())                  # CUDA + bf16 where available, else CPU fp32
    eng = load_engine("ckpt/", EngineConfig(device="cpu", dtype="bfloat16"))
    eng = load_engine("ckpt/", EngineConfig(tensor_parallel=2))  # under torchrun: this rank's shard
    eng.tokenizer                                                # the checkpoint's tokenizer, loaded once

Under torchrun the default device is cuda:LOCAL_RANK, so each rank samples on its own GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from selfreward.cli import passive
from selfreward.infer.sequence import Completion, SamplingParams
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


class EngineAPI(Protocol):
    """What recipes and trainers call on an engine: infer/engine.Engine, or a second backend. Sampling follows
    SamplingParams; log-probs are of the model's unmodified distribution (full-vocabulary log-softmax)."""
    tokenizer: object   # the checkpoint's tokenizer (None without one)
    max_len: int        # the model's max_position_embeddings: a prompt must be shorter
    eos: set[int]       # ids that end a sample (model EOS, tokenizer stop ids)
    stats: dict         # prefill_computed, prefix_hit, generated, preempted (over the engine's life)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 n: int = 1, progress: bool = False,
                 on_request: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        """n samples per prompt -> [per prompt][per sample]; on_request(i, completions) once prompt i is done.
        Sample j of a request with seed s is that request alone with seed s + j."""

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each continuation token."""

    def next_token_logprobs(self, prompts: list[list[int]], candidate_ids: list[int]) -> torch.Tensor:
        """[B, C] log-probs of each candidate token right after each prompt."""

    def load_weights(self, model: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict:
        """A trainer's weights (FSDP2 DTensors or plain; names starting with one of `skip` left out) copied
        in place, every trainer rank calling, with no request in flight; clears the prefix cache -> {seconds, bytes}."""

    def reply_ids(self, c: Completion) -> list[int]:
        """A completion's ids without the stop token that ended it."""


def load_engine(path, cfg: EngineConfig | None = None) -> EngineAPI:
    """The Engine for checkpoint `path` on the configured device, with the checkpoint's own tokenizer; with
    tensor_parallel T > 1, this rank's shard of a T-way replica (every rank of the replica calls this)."""
    from selfreward.infer.engine import Engine
    from selfreward.model.checkpoint import load_model
    from selfreward.model.tokenizer import Tokenizer
    cfg = cfg or EngineConfig()
    device, dtype = resolve_device(cfg)
    if cfg.tensor_parallel > 1:
        from selfreward.infer.parallel import init_tp, load_tp_model
        model = load_tp_model(path, init_tp(cfg.tensor_parallel), dtype, device)
    else:
        model = load_model(path, dtype=dtype, device=device)
    has_tok = any((Path(path) / f).exists() for f in ("tokenizer.model", "tokenizer.json"))
    return Engine(model, Tokenizer.load(path) if has_tok else None, cfg)
