"""train/heap.py: with the fixed mmap threshold, freed blocks leave the process (glibc; Linux only)."""
import os
import subprocess
import sys

import pytest
import torch

from selfreward.train.heap import release_freed_blocks

CHILD = """
import sys, torch
from pathlib import Path
from selfreward.train.heap import release_freed_blocks
def rss_mb():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1]) / 1024
if sys.argv[1] == "release":
    release_freed_blocks(torch.device("cpu"), release=True)
torch.ones(4 << 20)                           # a 16 MiB block freed: glibc's own threshold rises above 1 MiB
blocks = [torch.ones(1 << 18) for _ in range(300)]   # 300 blocks of 1 MiB, written
before = rss_mb()
del blocks[::2]                               # every other one freed: holes, not the heap's top
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_leave_the_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    freed = {how: float(subprocess.run([sys.executable, "-c", CHILD, how], env=env, capture_output=True, text=True,
                                       check=True).stdout) for how in ("keep", "release")}
    assert freed["release"] > 120            # the 150 MiB freed are given back
    assert freed["keep"] < 30                # glibc's default keeps them resident


def test_only_cpu_runs_and_the_environment_wins(monkeypatch):
    assert release_freed_blocks(torch.device("cpu"), release=False) == ""
    assert release_freed_blocks(torch.device("cuda", 0), release=True) == ""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "environment" in release_freed_blocks(torch.device("cpu"), release=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_run_leaves_the_heap_as_glibc_would():
    """After `released` (a trainer run inside a longer process, e.g. the loop), blocks below 32 MiB stay in the
    heap again: 150 MiB of freed 1 MiB blocks remain resident, as with glibc's own risen threshold."""
    child = CHILD.replace('if sys.argv[1] == "release":\n    release_freed_blocks(torch.device("cpu"), release=True)',
                          'from selfreward.train.heap import released\nwith released(torch.device("cpu"), True):\n'
                          '    pass')
    assert "released" in child
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", child, "after"], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 30
