"""The shape of a one-output command (rlaif label, evaluate rm / h2h / reward, select): claim the output
(provenance.claim: the lock, the record of what made it, --overwrite), make its records as resumable units
(units.run_units) with the model loaded only when a unit is left, and write the result under the lock."""

from pathlib import Path
from typing import Callable, Hashable, Iterable

from selfreward.provenance import claim
from selfreward.ranges import ConfigError
from selfreward.records import partial_path, read_jsonl
from selfreward.units import run_units


def claimed(out: str | Path, made: dict, inputs: Iterable = (), overwrite: bool = False, also: Iterable = (),
            folder: bool = False, adopt: bool = True):
    """provenance.claim(OUT); --overwrite first removes what an earlier run wrote: the file OUT (a folder: its
    files but the lock) and `also`, with their .partial files."""
    def clear() -> None:
        files = [p for p in Path(out).iterdir() if p.name != ".lock"] if folder and Path(out).is_dir() else \
            [] if folder else [Path(out)]
        for p in files + [Path(x) for x in also]:
            for q in (p, partial_path(p)):
                if not q.is_dir():
                    q.unlink(missing_ok=True)
    return claim(out, made, inputs, overwrite, folder=folder, clear=clear, adopt=adopt)


def unit_records(out: str | Path, units: list[dict], load: Callable, fn: Callable, chunk: int, progress: str,
                 unit: str, key: Callable[[dict], Hashable] = lambda r: r["i"]) -> list[dict]:
    """OUT's records, one per unit, made `chunk` units at a time by fn(engine, tok, [(index, unit)]) -> one
    (record, tokens) per unit; `load()` -> (engine, tok) is called at the first chunk left, so a finished OUT
    loads no model."""
    loaded = []

    def work(batch, emit) -> None:
        loaded[:] = loaded or [load()]
        for (i, _), (rec, tokens) in zip(batch, fn(*loaded[0], batch)):
            emit(i, [rec], tokens)
    run_units(Path(out), units, 1, key, work, chunk=chunk, progress=progress, unit=unit)
    return read_jsonl(out)


def parse(argv: list[str] | None, ap, engine_dests: set[str]):
    """The door of a hand-written command, before any file is touched: the numbers (`ap`: a cli.Parser), --k and
    --limit >= 1 (no range rule), the engine flags -> (args, EngineConfig, device, dtype name)."""
    from selfreward.infer.config import engine_from_flags, resolve_device
    a = ap.parse_args(argv)
    for flag in ("k", "limit"):
        if getattr(a, flag, None) is not None and getattr(a, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(a, flag)}: must be >= 1")
    ecfg = engine_from_flags(a, engine_dests)
    device, dtype = resolve_device(ecfg)
    return a, ecfg, device, str(dtype).removeprefix("torch.")
