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


def release_freed_blocks(device: torch.device, release: bool, say=lambda message: None) -> str:
    """On a CPU run under glibc, if `release` and the environment does not set MALLOC_MMAP_THRESHOLD_: fix the
    mmap threshold at THRESHOLD -> what was done ("" = nothing), also given to `say` for the log."""
    if device.type != "cpu" or not release:
        return ""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        said = "heap: MALLOC_MMAP_THRESHOLD_ from the environment"
    else:
        try:
            ok = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD)
        except (OSError, AttributeError):      # not glibc (macOS, Windows): nothing to set
            ok = 0
        said = f"heap: blocks of {THRESHOLD // 1024} KiB or more are mapped and returned when freed " \
               f"(--no-release-freed-memory: glibc's default)" if ok else ""
    if said:
        say(said)
    return said


@contextmanager
def released(device: torch.device, release: bool, say=lambda message: None):
    """release_freed_blocks for one run; after it, a process that goes on (the loop's next sampling stage) gets the
    threshold glibc's own would have reached (AFTER), not 128 KiB's page faults."""
    set_here = release_freed_blocks(device, release, say).startswith("heap: blocks")
    try:
        yield
    finally:
        if set_here:
            ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, AFTER)
