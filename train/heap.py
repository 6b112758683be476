"""Where a CPU trainer's freed memory goes (train/README.md, "Memory on the CPU").

glibc's malloc serves a block from its heap unless the block is at least the mmap threshold, which starts at
128 KiB and rises (up to 32 MiB) each time a larger mapped block is freed. After a few steps nearly every
activation a step frees is below it: the freed heap stays resident, fragmented, and the next step's peak stacks
on it (SmolLM2 SFT: resident 3.2 -> 4.8 GB over four steps of the same work). A fixed threshold (mallopt
M_MMAP_THRESHOLD, which also stops the rise) gives every block of THRESHOLD bytes or more a mapping of its own,
returned to the system when freed; the cost is the kernel's page faults when such a block is first touched
(measured: train/README.md, "Memory on the CPU"; DPO's default, off for the other trainers).
"""
import ctypes
import os
from contextlib import contextmanager

import torch

M_MMAP_THRESHOLD = -3          # glibc's malloc.h
THRESHOLD = 128 * 1024         # glibc's own starting value, kept fixed
AFTER = 32 * 1024 * 1024       # where glibc's own threshold ends up (its maximum on 64-bit): set when a run ends


def _threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes); False where there is no glibc (macOS, Windows) or it refuses."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


@contextmanager
def released(device: torch.device, release: bool, say=lambda message: None):
    """One run with the threshold fixed at THRESHOLD, if `release`, on the CPU, and the environment does not set
    MALLOC_MMAP_THRESHOLD_ (then it wins); `say` gets what was done. After the run, a process that goes on (the
    loop's next sampling stage) gets the threshold glibc's own would have reached (AFTER), not the page faults."""
    release = release and device.type == "cpu"
    env = release and "MALLOC_MMAP_THRESHOLD_" in os.environ
    mine = release and not env and _threshold(THRESHOLD)
    if env:
        say("heap: MALLOC_MMAP_THRESHOLD_ from the environment")
    elif mine:
        say(f"heap: blocks of {THRESHOLD // 1024} KiB or more are mapped and returned when freed "
            f"(--no-release-freed-memory: glibc's default)")
    try:
        yield
    finally:
        if mine:
            _threshold(AFTER)
