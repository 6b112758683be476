"""train/heap.py: with the fixed mmap threshold, freed blocks leave the process (glibc; Linux only)."""
import os
import subprocess
import sys

import pytest
import torch

from selfreward.train.heap import released

CHILD = """
import sys, torch
from pathlib import Path
from selfreward.train.heap import released
def rss_mb():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1]) / 1024
def work():
    torch.ones(4 << 20)                           # a 16 MiB block freed: glibc's own threshold rises above 1 MiB
    blocks = [torch.ones(1 << 18) for _ in range(300)]   # 300 blocks of 1 MiB, written
    before = rss_mb()
    del blocks[::2]                               # every other one freed: holes, not the heap's top
    return before - rss_mb()
with released(torch.device("cpu"), sys.argv[1] in ("release", "after")):
    freed = work()
print(work() if sys.argv[1] == "after" else freed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_leave_the_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    freed = {how: float(subprocess.run([sys.executable, "-c", CHILD, how], env=env, capture_output=True, text=True,
                                       check=True).stdout) for how in ("keep", "release")}
    assert freed["release"] > 120            # the 150 MiB freed are given back
    assert freed["keep"] < 30                # glibc's default keeps them resident


def said(device, release) -> list[str]:
    out = []
    with released(device, release, say=out.append):
        pass
    return out


def test_only_cpu_runs_and_the_environment_wins(monkeypatch):
    assert said(torch.device("cpu"), False) == []
    assert said(torch.device("cuda", 0), True) == []
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert len(m := said(torch.device("cpu"), True)) == 1 and "environment" in m[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_run_leaves_the_heap_as_glibc_would():
    """After `released` (a trainer run inside a longer process, e.g. the loop), blocks below 32 MiB stay in the
    heap again: 150 MiB of freed 1 MiB blocks remain resident, as with glibc's own risen threshold."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, "after"], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 30
