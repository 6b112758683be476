"""Resumable units (selfreward.units.run_units) over data-parallel replicas of tensor-parallel engines.

The units are split across replicas, not ranks. The first rank of each replica (its leader) runs
run_units as rank `replica` of the leaders' group: it alone reads and writes the .partial / shard files
and merges. Before each batch of work it broadcasts the batch to the other ranks of its replica, which
run the same work (the engine needs every rank of the group) and drop the records. So every rank of a
replica works on exactly the leader's batches, whatever the leader found already done on disk.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch.distributed as dist

from selfreward.infer.parallel import TPGroup
from selfreward.units import Work, run_units


def run_units_tp(tp: TPGroup, out: Path, units: Sequence[dict], per_unit: int, key: Callable[[dict], Hashable],
                 work: Work, chunk: int = 32, progress: str = "", unit: str = "units") -> bool:
    """run_units for DP x TP. -> True on the rank that wrote the final OUT."""
    if tp.size == 1:
        return run_units(out, units, per_unit, key, work, chunk, rank=tp.replica, world=tp.num_replicas,
                         progress=progress, unit=unit)
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


def run_stage_units(tensor_parallel: int, chunk: int, rank: int, world: int, out: Path, units: Sequence[dict],
                    per_unit: int, key: Callable[[dict], Hashable], work: Work, progress: str = "",
                    unit: str = "units") -> bool:
    """A recipe stage's units: records.run_units over the ranks, or (tensor_parallel > 1, the engine
    config's) over the data-parallel replicas of tensor-parallel engines."""
    if tensor_parallel > 1:
        from selfreward.infer.parallel import init_tp
        return run_units_tp(init_tp(tensor_parallel), out, units, per_unit, key, work, chunk, progress, unit)
    return run_units(out, units, per_unit, key, work, chunk, rank, world, progress, unit)


@contextmanager
def stage_group(device: str, world: int):
    """The process group of a sharded stage under torchrun (world > 1): gloo on the CPU, NCCL with each rank
    on its own GPU (cuda:LOCAL_RANK) when the engines run on CUDA; destroyed on the way out."""
    if world <= 1:
        yield
        return
    import torch
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")   # the shards' barrier, the TP collectives
    try:
        yield
    finally:
        dist.destroy_process_group()
