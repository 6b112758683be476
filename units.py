"""Resumable, shardable work over units (a prompt and its N candidates; a candidate and its K judgments): each
unit's records are written together once it is done. On restart the `.partial` file tells which units are
complete (exactly `per_unit` records); an incomplete unit's records are dropped and the unit redone, so nothing
is lost or duplicated. Under torchrun (WORLD_SIZE > 1) rank r takes units r, r+W, ... into its own
`NAME.rank{r}` file; rank 0 then merges them in unit order into NAME. Units are independent and seeded by
their index, so the merged file is the same whatever the number of ranks."""

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, Sequence

from selfreward.progress import Progress
from selfreward.records import DataError, PartialWriter, read_jsonl, write_jsonl


# work(batch, emit): batch = [(unit index, unit)]; emit(unit index, records, tokens=0) once per finished unit
Work = Callable[[list[tuple[int, dict]], Callable[..., None]], None]


def dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_units(out: Path, units: Sequence[dict], per_unit: int, key: Callable[[dict], Hashable], work: Work,
              chunk: int = 32, rank: int = 0, world: int = 1, progress: str = "", unit: str = "units",
              group=None) -> bool:
    """Process the units not yet done, `chunk` at a time, appending to OUT.partial (per rank).
    Returns True when this process wrote the final OUT (rank 0), False on other ranks. `group`: the
    process group that rank / world number (default the whole job; infer/parallel.py passes the first
    rank of each tensor-parallel replica)."""
    out = Path(out)
    sync = barrier if group is None else (lambda: barrier(group))
    shards = [out] if world == 1 else [out.with_name(f"{out.name}.rank{r}") for r in range(world)]
    mine = [(i, u) for i, u in enumerate(units) if i % world == rank]

    def keep(records: list[dict]) -> list[dict]:
        n = Counter(key(r) for r in records)
        return [r for r in records if n[key(r)] == per_unit]

    if not shards[rank].exists():
        with PartialWriter(shards[rank], keep=keep) as w:
            done = {key(r) for r in w.records}
            todo = [(i, u) for i, u in mine if key(u) not in done]
            bar = Progress(progress, len(mine), len(mine) - len(todo), unit) if progress and todo else None

            def emit(i: int, recs: list[dict], tokens: int = 0) -> None:
                if len(recs) != per_unit:
                    raise RuntimeError(f"unit {i} gave {len(recs)} records, expected {per_unit}")
                w.write(recs)
                if bar:
                    bar.update(1, tokens)

            for s in range(0, len(todo), chunk):
                work(todo[s:s + chunk], emit)
            w.finish()
    if world > 1:
        sync()                        # every rank's shard is complete before rank 0 merges
        if rank != 0:
            sync()
            return False
    if missing := [p for p in shards if not p.exists()]:
        raise RuntimeError(f"{out}: shard(s) {', '.join(map(str, missing))} missing after the barrier")
    order = {key(u): i for i, u in enumerate(units)}
    recs = [r for p in shards for r in read_jsonl(p)]

    def unit_of(r: dict):
        try:
            return key(r)
        except (KeyError, TypeError):              # a record without the unit's key field
            return ("no key", json.dumps(r, sort_keys=True)[:60])
    # exactly this run's units, or a file made for others (an adopted output, an earlier version) is refused
    n = Counter(unit_of(r) for r in recs)
    other = [k for k in n if k not in order]
    if other or len(n) != len(order) or any(v != per_unit for v in n.values()):
        what = f"unit {other[0]!r} is not one of this run's" if other else \
            f"{len(n)} of this run's {len(order)} units, {per_unit} record(s) each expected"
        raise DataError(f"{out}: holds other work ({what}); remove it or pass --overwrite to start over")
    ordered = sorted(recs, key=lambda r: order[key(r)])   # units finish out of order; stable within a unit
    if world > 1 or ordered != recs:
        write_jsonl(out, ordered)
    if world > 1:
        for p in shards:
            p.unlink()
        sync()                        # the merged file exists before any rank goes on
    return True


def barrier(group=None) -> None:
    """All ranks of the torchrun job (or of `group`) meet here (the caller has run init_process_group)."""
    import torch.distributed as dist
    dist.barrier(group=group)
