"""The door every number passes: one table of ranges by the last part of a setting's name (the flag's too),
checked for flags and `--config` files alike (cli.from_dict, every cli.parser parser, and check_args for the
hand-written parsers), before any model loads; every float must also be finite. Settings with a meaning of
their own keep their extra rules in their config's check(). docs/flags.md lists every entry point's flags.
"""
from __future__ import annotations

import argparse
import math

from selfreward.records import DataError


class ConfigError(DataError):
    """A bad flag or config value: the message names the flag."""


RANGES = {  # suffix: (low, high, low open, high open); None = unbounded
    "temperature": (0, None, False, False), "top_p": (0, 1, True, False), "top_k": (0, None, False, False),
    "max_tokens": (1, None, False, False), "max_new_tokens": (1, None, False, False),
    "num_samples": (1, None, False, False), "n_candidates": (1, None, False, False), "judge_k": (1, None, False, False),
    "final_lr": (0, None, False, False), "lr": (0, None, True, False), "weight_decay": (0, None, False, False),
    "beta": (0, None, False, False), "threads": (0, None, False, False), "nproc": (1, None, False, False),
    "near_dup": (0, 1, False, False), "rouge_threshold": (0, 1, False, False), "n": (1, None, False, False),
    "fraction": (0, 1, False, True), "eval_frac": (0, 1, False, True), "chunk": (1, None, False, False),
    "frac": (0, 1, False, False), "p_right": (0, 1, False, False), "p_judge": (0, 1, False, False),
    "block_size": (1, None, False, False), "num_blocks": (0, None, False, False), "max_num_seqs": (1, None, False, False),
    "max_num_batched_tokens": (1, None, False, False), "tensor_parallel": (1, None, False, False),
    # the trainers' settings (TrainConfig.check's rules), so a recipe's nested --dpo-* / --sft-* are checked too
    "micro_batch_size": (0, None, False, False), "batch_size": (1, None, False, False), "batch": (1, None, False, False),
    "epochs": (0, None, False, False), "max_steps": (0, None, False, False), "warmup_steps": (-1, None, False, False),
    "log_every": (1, None, False, False), "every": (0, None, False, False), "keep_checkpoints": (1, None, False, False),
    "max_prompt_length": (0, None, False, False), "max_length": (2, None, False, False),
    "beta1": (0, 1, False, True), "beta2": (0, 1, False, True), "dropout": (0, 1, False, True),
    "grad_clip": (0, None, False, False), "nll_alpha": (0, None, False, False), "value_coef": (0, None, False, False),
    "label_smoothing": (0, 0.5, False, True), "simpo_gamma": (0, None, False, False),
    "sleep_per_step": (0, None, False, False), "margin": (0, None, False, False), "scale": (0, None, True, False),
    "limit": (0, None, False, False), "curate_k": (1, None, False, False), "iterations": (1, None, False, False),
    "iter": (1, None, False, False),
    "judge_self_train": (0, None, False, False), "eft_mix": (0, None, False, False), "steps": (0, None, False, False),
    "shots": (0, None, False, False), "words": (0, None, False, False), "rounds": (1, None, False, False),
    "segments": (0, None, False, False), "shingle": (1, None, False, False), "groups": (0, None, False, False),
    # the world's sizes (recipes/world): counts, and M0's shape
    **{k: (0, None, False, False) for k in ("n_control", "n_eft", "n_eval", "n_ift", "n_judge", "n_pass", "n_pref",
                                            "n_prompts", "n_unlabelled", "web_docs")},
    **{k: (1, None, False, False) for k in ("context", "ffn", "heads", "hidden", "layers", "vocab")},
    "seed": (None, None, False, False),   # any integer
}


def _range_rule(name: str):
    return next((r for suf, r in RANGES.items() if name == suf or name.endswith("_" + suf)), None)


def check_number(flag: str, v) -> None:
    """A number given for `flag`: finite, and inside RANGES' rule for its name -> ConfigError naming the flag."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if not math.isfinite(v):
        raise ConfigError(f"{flag} {v}: must be a finite number")
    rule = _range_rule(flag.lstrip("-").replace("-", "_"))
    if rule:
        lo, hi, lo_open, hi_open = rule
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
            want = f"be {'>' if lo_open else '>='} {lo}" if hi is None else \
                f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ConfigError(f"{flag} {v:g}: must {want}")


def check_args(ns: argparse.Namespace) -> argparse.Namespace:
    """check_number on every number parsed (lists too), for the hand-written parsers."""
    for dest, v in vars(ns).items():
        if not dest.startswith("_"):
            for x in (v if isinstance(v, list) else [v]):
                check_number("--" + dest.replace(".", "-").replace("_", "-"), x)
    return ns
