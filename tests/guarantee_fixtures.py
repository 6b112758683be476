"""Shared pieces of the issue-19 tests (no tests here): one tiny model with its tokenizer, prompts, SFT and
DPO files, and the flags of a short, deterministic run of each command."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli_harness import MODULES, ROOT, SCRIPTS
from test_train_fixtures import dpo_records, make_model, make_spm, sft_records, write_jsonl


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared machine: one thread is fastest (conftest leaves two)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def build(d: Path) -> dict:
    spm = make_spm(d / "spm")
    paths = {"model": make_model(d / "m0", spm), "model_b": make_model(d / "m0b", spm, seed=1)}
    paths["prompts"] = write_jsonl(d / "prompts.jsonl", [{"id": i, "prompt": f"Tell me a story about {i} cats."}
                                                          for i in range(6)])
    paths["many_prompts"] = write_jsonl(d / "many.jsonl", [{"id": i, "prompt": f"Sort the numbers {i} {i + 3}."}
                                                            for i in range(24)])
    paths["sft"] = write_jsonl(d / "sft.jsonl", sft_records(24, seed=1))
    paths["pairs"] = write_jsonl(d / "pairs.jsonl", dpo_records(16, seed=2))
    return paths


def sample_args(w: dict, out: Path, inp: str = "prompts", *extra) -> list[str]:
    return ["--model", str(w["model"]), "--input", str(w[inp]), "--output", str(out), "--n", "2",
            "--max-tokens", "8", "--seed", "3", *extra]


def sft_args(w: dict, out: Path, *extra) -> list[str]:
    return ["--model", str(w["model"]), "--data", str(w["sft"]), "--output", str(out), "--max-steps", "6",
            "--batch-size", "4", "--lr", "1e-3", "--final-lr", "1e-4", "--max-length", "40", "--save-every", "2",
            "--warmup-steps", "1", "--dropout", "0.1", *extra]


def dpo_args(w: dict, out: Path, *extra) -> list[str]:
    return ["--model", str(w["model"]), "--data", str(w["pairs"]), "--output", str(out), "--max-steps", "6",
            "--batch-size", "4", "--lr", "1e-3", "--max-length", "40", "--save-every", "2", "--dropout", "0", *extra]


def start(name: str, argv: list[str]) -> subprocess.Popen:
    """The real command in its own process (for kills, Ctrl-C and for a second writer). SIGINT is reset to
    its default first: a shell without job control starts background jobs ignoring it, and Python then
    installs no KeyboardInterrupt handler."""
    import signal
    cmd = [str(SCRIPTS[name])] if name in SCRIPTS else ["-m", MODULES[name]]
    return subprocess.Popen([sys.executable, *cmd, *map(str, argv)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@contextlib.contextmanager
def disk_full_at(monkeypatch, nth: int):
    """selfreward.records' one append path fails with ENOSPC on its nth call (a disk that fills up there);
    the real one is back after the block."""
    import errno
    from selfreward import records
    real, calls = records._write_all, []

    def append(fd, data):
        calls.append(1)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(records, "_write_all", append)
    try:
        yield
    finally:
        monkeypatch.setattr(records, "_write_all", real)


def wait_for(cond, p: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll `cond()` until true -> True; False if the process ended first."""
    end = time.time() + timeout
    while not cond():
        if p.poll() is not None or time.time() > end:
            return cond()
        time.sleep(0.02)
    return True


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))
