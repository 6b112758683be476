"""The settings both trainers share, and `--flag value` parsing into a config dataclass.

Each field `some_name` becomes `--some-name`; bools take `--x/--no-x`; list fields take several values.
The trainer dataclasses (SFTConfig, DPOConfig) extend TrainConfig and override the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    model: str = ""                   # HF checkpoint folder to start from (also the DPO reference)
    data: list[str] = field(default_factory=list)  # JSONL file(s)
    output: str = ""                  # run folder: metrics.jsonl, checkpoints/, model/
    export: str = ""                  # final HF export folder (default: OUTPUT/model)
    tokenizer: str = ""               # tokenizer folder (default: --model)
    max_steps: int = 0                # optimizer steps; 0 = epochs x (examples // batch_size)
    epochs: int = 1
    batch_size: int = 16              # GLOBAL batch in examples = micro x accumulation x world size
    micro_batch_size: int = 0         # examples per forward per rank; 0 = batch_size // world (no accumulation)
    lr: float = 1e-5
    final_lr: float = 1e-6            # the schedule decays lr to this at the last step
    schedule: str = "cosine"          # cosine | linear
    warmup_steps: int = -1            # linear warmup from 0; -1 = 3% of the steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 = no clipping
    max_length: int = 2048            # tokens per example (see train/data.py for the truncation rule)
    dropout: float = 0.1
    seed: int = 0
    shuffle: bool = True              # shuffle examples each epoch (a function of seed and epoch)
    save_every: int = 0               # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2
    resume: bool = False              # continue from OUTPUT/checkpoints/latest if there is one
    log_every: int = 1
    activation_checkpointing: bool = False
    mixed_precision: bool = True      # bf16 params + fp32 reduction under FSDP on CUDA (CPU: always fp32)
    threads: int = 0                  # torch.set_num_threads (0 = leave as is)
    sleep_per_step: float = 0.0       # test aid: slow the loop so a test can kill it mid-run

    def check(self) -> None:
        for name in ("model", "output"):
            if not getattr(self, name):
                raise SystemExit(f"--{name.replace('_', '-')} is required")
        if not self.data:
            raise SystemExit("--data is required")
        if self.schedule not in ("cosine", "linear"):
            raise SystemExit(f"--schedule {self.schedule!r}: choose cosine or linear")


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the class bodies (subclass wins): the flags' help texts."""
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(c), re.M):
                out[m.group(1)] = m.group(2).replace("%", "%%")
    return out


def parse_config(cls, argv: list[str] | None, description: str = ""):
    """Build an argparse parser from the dataclass fields of `cls` and return a filled instance."""
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{helps.get(f.name, '')} (default: {default!r})".strip()
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif typing.get_origin(t) is list:
            p.add_argument(flag, nargs="+", type=typing.get_args(t)[0], default=default, help=h)
        else:
            p.add_argument(flag, type=t, default=default, help=h)
    ns = p.parse_args(argv)
    cfg = cls(**vars(ns))
    cfg.check()
    return cfg
