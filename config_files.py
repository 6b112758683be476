"""What `--config FILE [KEY=VALUE ...]` reads, and the other spellings a flag may arrive in (cli.Parser calls these).

- FILE: JSON, or YAML when it ends in .yaml / .yml (PyYAML, imported then); an error is `FILE:LINE: what`.
- KEY=VALUE after it: one setting of the file overridden, KEY the field's dotted name (`lr`, `engine.dtype`) or
  its flag's (`engine-dtype`); each is parsed and checked as its flag would be (a list: VALUE,VALUE; a bool:
  true / false), and a flag given on the command line wins over it.
- `--max_steps` (a flag with underscores) is `--max-steps`; TRL's names for settings we have under another name
  (`--learning_rate`) are refused with ours, never taken with a meaning they may not have here.
"""

import argparse
import difflib
import json
import re
from pathlib import Path

from selfreward.ranges import ConfigError, check_number

# TRL / transformers TrainingArguments names -> ours (the ones that only differ by "_" for "-" need no entry)
TRL = {
    "--learning_rate": "--lr", "--output_dir": "--output", "--model_name_or_path": "--model",
    "--num_train_epochs": "--epochs", "--lr_scheduler_type": "--schedule", "--max_grad_norm": "--grad-clip",
    "--logging_steps": "--log-every", "--save_steps": "--save-every", "--save_total_limit": "--keep-checkpoints",
    "--eval_steps": "--eval-every", "--gradient_checkpointing": "--activation-checkpointing",
    "--logging_dir": "--tensorboard-dir", "--resume_from_checkpoint": "--resume", "--loss_type": "--loss",
    "--overwrite_output_dir": "--overwrite", "--warmup_ratio": "--warmup-steps", "--dataset_name": "--data",
    "--per_device_train_batch_size": "--micro-batch-size", "--gradient_accumulation_steps": "--batch-size",
}
GLOBAL = "--batch-size (the GLOBAL batch) = --micro-batch-size x accumulation x world size"
OURS = {"--per_device_train_batch_size": f"ours is --micro-batch-size (examples per forward per rank), with {GLOBAL}",
        "--gradient_accumulation_steps": f"here accumulation follows from {GLOBAL}",
        "--warmup_ratio": "ours is --warmup-steps (in steps)", "--dataset_name": "ours is --data (JSONL files)"}


def close(name: str, names) -> str:
    """"; did you mean 'x'?" for the nearest of `names`, or ""."""
    got = difflib.get_close_matches(name, list(names), 1, 0.6)
    return f"; did you mean {got[0]!r}?" if got else ""


def load(path: str) -> dict:
    """A config file's settings: JSON, or YAML (.yaml / .yml); a syntax error names the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        class Loader(yaml.SafeLoader):   # YAML 1.2 floats: `lr: 1e-5` is a number (1.1 wants 1.0e-5)
            pass
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
            r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))
        try:
            d = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{path}:{mark.line + 1 if mark else 1}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: {e.msg} (column {e.colno})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value), got a {type(d).__name__}")
    return d


def respell(args: list[str], actions: dict[str, argparse.Action]) -> list[str]:
    """`--max_steps` -> `--max-steps` where that flag exists; TRL's name of one of our flags -> a ConfigError."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        name, eq, val = a.partition("=")
        if not name.startswith("--") or name in actions or "_" not in name:
            continue
        if name.replace("_", "-") in actions:
            out[i] = name.replace("_", "-") + eq + val
        elif TRL.get(name) in actions:
            raise ConfigError(f"{name}: this is TRL's name; {OURS.get(name, 'ours is ' + TRL[name])}")
    return out


def unknown(rest: list[str], actions: dict[str, argparse.Action]) -> str:
    """argparse's leftovers -> "unrecognized arguments: ..." with the nearest flag of the first unknown one."""
    first = next((a.partition("=")[0] for a in rest if a.startswith("-")), "")
    return f"unrecognized arguments: {' '.join(rest)}" + (close(first, actions) if first else "")


def overrides(ns: argparse.Namespace, actions: dict[str, argparse.Action], dests: list[str]) -> None:
    """`--config FILE KEY=VALUE ...` -> ns.config = FILE, each KEY's flag value set (unless its flag was given)."""
    path, *items = ns.config
    ns.config = path
    known = {d: a for a in actions.values() if (d := a.dest) in dests}
    for item in items:
        key, eq, val = item.partition("=")
        where = f"--config {path} {item}"
        flag = "--" + key.replace(".", "-").replace("_", "-")
        act = actions.get(flag)
        if not eq or not key or act is None or act.dest not in known:
            why = "expected KEY=VALUE" if not eq or not key else f"unknown setting {key!r}" + close(key, known)
            raise ConfigError(f"{where}: {why}")
        one = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        one._add_action(act)
        if isinstance(act, argparse.BooleanOptionalAction):
            low = val.lower()
            if low not in ("true", "false", "yes", "no", "1", "0"):
                raise ConfigError(f"{where}: expected true or false")
            tokens = [flag if low in ("true", "yes", "1") else "--no-" + flag[2:]]
        else:
            tokens = [flag, *(val.split(",") if act.nargs == "+" else [val])]
        try:
            v = getattr(one.parse_args(tokens), act.dest)
        except argparse.ArgumentError as e:
            raise ConfigError(f"{where}: {e.message}") from None
        try:
            check_number(flag, v)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if getattr(ns, act.dest) is None:
            setattr(ns, act.dest, v)
