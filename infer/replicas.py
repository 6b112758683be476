"""Resumable units (units.run_units) over data-parallel replicas of tensor-parallel engines: each replica's
first rank runs them and writes, the others follow its batches (infer/README.md, "DP x TP").
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.distributed as dist

from selfreward.infer.parallel import init_tp
from selfreward.units import Work, run_units


def run_stage_units(tensor_parallel: int, chunk: int, rank: int, world: int, out: Path, units: Sequence[dict],
                    per_unit: int, key: Callable[[dict], Hashable], work: Work, progress: str = "",
                    unit: str = "units") -> bool:
    """run_units over the ranks, or (tensor_parallel > 1) over DP x TP replicas -> True on the rank that wrote OUT."""
    if tensor_parallel == 1:
        return run_units(out, units, per_unit, key, work, chunk, rank, world, progress, unit)
    tp = init_tp(tensor_parallel)
    leader = tp.replica * tp.size    # the leader's global rank

    def share(msg):
        box = [msg]
        dist.broadcast_object_list(box, src=leader, group=tp.group)
        return box[0]

    if tp.rank == 0:
        def lead(batch, emit):
            share(batch)
            work(batch, emit)
        try:
            wrote = run_units(out, units, per_unit, key, lead, chunk, rank=tp.replica, world=tp.num_replicas,
                              progress=progress, unit=unit, group=tp.leaders if tp.num_replicas > 1 else None)
        finally:
            share(None)              # the followers stop (also when the leader failed: no rank hangs)
    else:
        wrote, err = False, None
        while (batch := share(None)) is not None:
            if err is None:
                try:
                    work(batch, lambda *emitted: None)
                except Exception as e:   # the leader fails alike (same inputs): wait for its stop message
                    err = e
        if err is not None:
            raise err
    dist.barrier()                   # the merged OUT exists before any rank goes on
    return wrote


@contextmanager
def stage_group(device: str, world: int):
    """The process group of a sharded run under torchrun (world > 1), gloo or NCCL (cuda:LOCAL_RANK), destroyed on
    the way out; one the caller made itself (tests/tp_worker.py) is used and left as it is."""
    if world <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")   # the shards' barrier, the TP collectives
    try:
        yield
    finally:
        dist.destroy_process_group()
