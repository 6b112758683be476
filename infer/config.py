"""EngineConfig and load_engine, the one factory every caller loads an engine with (infer/README.md, "API")."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from selfreward import cli
from selfreward.ranges import check_fields
from selfreward.records import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    device: str = cli.passive("")                  # "" = cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = ""                   # float32 | bfloat16 | float16; "" = bfloat16 on CUDA, float32 on CPU
    block_size: int = cli.passive(16)              # tokens per KV block
    num_blocks: int = cli.passive(0)               # KV blocks in the pool; 0 = enough for max_num_seqs (memory-capped)
    max_num_seqs: int = cli.passive(256)           # sequences decoded together
    max_num_batched_tokens: int = cli.passive(4096)   # tokens per engine step (prefill chunks + decodes)
    prefix_cache: bool = cli.passive(True)         # share KV blocks of equal prefixes (judge rubric, few-shot header)
    tensor_parallel: int = cli.passive(1)          # ranks per engine replica (infer/parallel.py); > 1 needs torchrun
    cuda_graphs: bool = False         # decode from CUDA graphs per batch-size bucket (CUDA only; untested)
    backend: str = cli.choice("ours", "vllm")      # ours | vllm (vllm.LLM in process: infer/external.py)
    url: str = ""                     # OpenAI-compatible server(s) URL[,URL...] instead (infer/remote.py)

    def check(self) -> None:
        """A bad setting is a DataError (a ValueError) naming it; the numbers by ranges.check_fields, as at the door."""
        if self.dtype and self.dtype not in DTYPES:
            raise DataError(f"engine dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.url and self.backend != "ours":
            raise DataError(f"--engine-url and --engine-backend {self.backend}: choose one (a URL is the engine)")
        if (self.url or self.backend != "ours") and self.cuda_graphs:
            raise DataError("--engine-cuda-graphs is our engine's; vLLM makes its own graphs")
        check_fields(self)


def add_engine_flags(p) -> set[str]:
    """--engine-device, --engine-dtype, ... (every field but tensor_parallel) on an argparse parser -> the dests."""
    return cli.add_flags(p, EngineConfig, prefix="engine.", skip={"": {"tensor_parallel"}})


def engine_from_flags(ns, dests: set[str]) -> EngineConfig:
    """The EngineConfig of add_engine_flags' flags (defaults for those not given; resolve_device checks it)."""
    return cli.from_dict(EngineConfig, {k.split(".", 1)[1]: getattr(ns, k) for k in dests
                                        if getattr(ns, k) is not None}, "flags")


def resolve_device(cfg: EngineConfig) -> tuple[str, torch.dtype]:
    """(device, dtype) the engine runs with: the configured ones, else CUDA/bf16 where available."""
    cfg.check()
    device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if cfg.cuda_graphs and not device.startswith("cuda"):
        raise DataError(f"engine cuda_graphs needs a CUDA device; the engine's device is {device}")
    return device, DTYPES[dtype]


def load_engine(path, cfg: EngineConfig | None = None, url_flag: str = "--engine-url"):
    """The Engine for checkpoint `path` on the configured device, with the checkpoint's own tokenizer; with
    tensor_parallel T > 1, this rank's shard of a T-way replica (every rank of the replica calls this).
    `url_flag`: the setting that gave cfg.url, named in a server's errors."""
    from selfreward.infer.engine import Engine
    from selfreward.model.checkpoint import load_model
    from selfreward.model.tokenizer import Tokenizer
    cfg = cfg or EngineConfig()
    device, dtype = resolve_device(cfg)
    if cfg.url or cfg.backend != "ours":      # another engine behind the same interface (infer/external.py)
        from selfreward.infer.external import VLLMEngine
        from selfreward.infer.remote import RemoteEngine
        tok = Tokenizer.load(path)
        return RemoteEngine(path, cfg, tok, url_flag) if cfg.url else VLLMEngine(path, cfg, tok)
    if cfg.tensor_parallel > 1:
        from selfreward.infer.parallel import init_tp, tp_model
        from selfreward.model.config import ModelConfig
        model = tp_model(ModelConfig.from_json(path), init_tp(cfg.tensor_parallel), dtype, device, path)
    else:
        model = load_model(path, dtype=dtype, device=device)
    has_tok = any((Path(path) / f).exists() for f in ("tokenizer.model", "tokenizer.json"))
    return Engine(model, Tokenizer.load(path) if has_tok else None, cfg)
