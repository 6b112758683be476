"""Resumable, shardable work over units (a prompt and its N candidates; a candidate and its K judgments).

Each unit's records are written together once the unit is done. On restart the `.partial` file tells which
units are complete (exactly `per_unit` records); the records of an incomplete unit are dropped and the unit
is redone, so nothing is lost or duplicated. Under torchrun (WORLD_SIZE > 1) rank r takes units r, r+W, ...
into its own `NAME.rank{r}` file; rank 0 then merges them in unit order into NAME. Units are independent
and seeded by their index, so the merged file is the same whatever the number of ranks.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, Sequence

from model.jsonl import PartialWriter, read_jsonl, write_jsonl

# work(batch, emit): batch = [(unit index, unit)], emit(unit index, records) once per finished unit
Work = Callable[[list[tuple[int, dict]], Callable[[int, list[dict]], None]], None]


def dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_units(out: Path, units: Sequence[dict], per_unit: int, key: Callable[[dict], Hashable], work: Work,
              chunk: int = 32, rank: int = 0, world: int = 1, progress: str = "",
              merge_timeout: float = 24 * 3600) -> bool:
    """Process the units not yet done, `chunk` at a time, appending to OUT.partial (per rank).
    Returns True when this process wrote the final OUT (rank 0), False on other ranks."""
    out = Path(out)
    mine_path = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    mine = [(i, u) for i, u in enumerate(units) if i % world == rank]

    def keep(records: list[dict]) -> list[dict]:
        n = Counter(key(r) for r in records)
        return [r for r in records if n[key(r)] == per_unit]

    if not mine_path.exists():
        with PartialWriter(mine_path, keep=keep) as w:
            done = {key(r) for r in w.records}
            todo = [(i, u) for i, u in mine if key(u) not in done]
            t0, n0 = time.perf_counter(), len(mine) - len(todo)

            def emit(i: int, recs: list[dict]) -> None:
                if len(recs) != per_unit:
                    raise RuntimeError(f"unit {i} gave {len(recs)} records, expected {per_unit}")
                w.write(recs)

            for s in range(0, len(todo), chunk):
                work(todo[s:s + chunk], emit)
                if progress:
                    d = min(s + chunk, len(todo))
                    el = time.perf_counter() - t0
                    print(f"[{progress}] {n0 + d}/{len(mine)} units, {d / max(el, 1e-9):.2f} units/s, "
                          f"ETA {el / d * (len(todo) - d):.0f}s", flush=True)
            w.finish()
    if world == 1:
        return True
    if rank != 0:
        return False
    shards = [out.with_name(f"{out.name}.rank{r}") for r in range(world)]
    t0 = time.time()
    while not all(p.exists() for p in shards):
        if time.time() - t0 > merge_timeout:
            raise TimeoutError(f"{out}: waited {merge_timeout}s for the other ranks' shards")
        time.sleep(0.5)
    order = {key(u): i for i, u in enumerate(units)}
    recs = [r for p in shards for r in read_jsonl(p)]
    recs.sort(key=lambda r: order[key(r)])   # stable: a unit's records keep their order
    write_jsonl(out, recs)
    for p in shards:
        p.unlink()
    return True
