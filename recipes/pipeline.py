"""One run folder, a list of stages: what every method's driver shares.

A recipe declares its stages (`Stage`: a name, the function, the file that marks it done, whether it shards
over ranks or trains) and its manifest; this module owns the rest, once:
- the run folder: one driver per RUN (RUN/.lock), RUN/config.json checked against the settings that shape the
  data (cli.PASSIVE marks the others) before any stage, `--overwrite` deleting the recipe's layout first;
- skip-if-done (a stage whose output exists is not run again; a killed sampling stage resumes its .partial);
- the engine released before a training stage, a sharded stage re-entered under torchrun when cfg.nproc > 1;
- several machines (cfg.nnodes > 1, nodes.py): node 0 runs all this, its torchruns spanning the nodes; the others
  only join those torchruns;
- the timings and the manifest after each stage, and the one `--stage/--iter/--overwrite` main.
A one-output command (rlaif label, evaluate rm / h2h / reward, select) is one stage of the same parts: `claimed`
(the lock, the record of what made OUT, --overwrite), `unit_records` (resumable units, the model loaded only when
a unit is left) and `parse` (the door of a hand-written parser).

    RECIPE = Recipe("selfreward.recipes.self_reward", LoopConfig, head=(), body=(Stage("prompts", ...), ...), ...)
    pipeline.run(RECIPE, cfg)                         # every stage of every iteration
    pipeline.main(RECIPE, argv, __doc__, skip)        # python -m MODULE [--stage S --iter T] [--overwrite]
"""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable

from selfreward import cli, nodes
from selfreward.infer.parallel import run_stage_units, stage_group
from selfreward.provenance import check_settings, claim, output_lock
from selfreward.recipes.session import Session
from selfreward.records import partial_path, read_json, read_jsonl, write_json
from selfreward.units import dist_env, run_units


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable            # run(cfg, t, session, rank, world) -> stats for the manifest (a dict) or None
    output: str = ""         # the file (under RUN for head stages, RUN/iter_t for the others) that marks it done
    shards: bool = False     # a sampling stage: split over cfg.nproc ranks (torchrun) when nproc > 1
    trains: bool = False     # a trainer: the engine is released first (it needs the memory)
    timed: bool = True       # recorded in the manifest's timings (hooks such as an evaluation are not)
    when: Callable = lambda cfg: True   # the stage runs only where when(cfg) (an optional stage: --meta-judge)


@dataclass(frozen=True)
class Recipe:
    module: str                          # `python -m MODULE --config RUN/config.json --stage S --iter T`
    config: type                         # the recipe's config dataclass
    head: tuple[Stage, ...]              # once, before the iterations (t = 0)
    body: tuple[Stage, ...]              # per iteration t = 1..cfg.iterations (a config without them: none)
    manifest: Callable                   # manifest(cfg, t, timings, stats) -> the manifest written
    layout: tuple[str, ...]              # what --overwrite deletes: globs under RUN
    prepare: Callable = lambda cfg, s: None        # checks before any stage (inputs exist, prompts fit)
    report: Callable = lambda cfg, t, m: None      # a line per finished iteration

    def stage(self, name: str) -> Stage:
        return next(s for s in self.head + self.body if s.name == name)


def seed(cfg, t: int, stage: int) -> int:
    """The sampling seed of a recipe's stage number `stage` in iteration t (0: before the iterations)."""
    return cfg.seed * 1_000_003 + t * 10_007 + stage * 100_000_007


def folder(cfg, t: int) -> Path:
    """RUN for t = 0, else RUN/iter_t."""
    return Path(cfg.run_dir) / (f"iter_{t}" if t else "")


def units(cfg, rank: int, world: int, out: Path, todo, per_unit: int, key, work, label: str, unit: str) -> bool:
    """A sampling stage's resumable units over the ranks, or over tensor-parallel replicas (infer/parallel.py)."""
    return run_stage_units(cfg.engine.tensor_parallel, cfg.chunk, rank, world, out, todo, per_unit, key, work,
                           label, unit)


def judged(r, base: dict) -> list[dict]:
    """One record per judge sample of a judged item (recipes.judge.Judged `r`), each with the item's `base`."""
    recs = [{**base, "k": k, "judgment": x, "score": sc, "prompt_cut": r.prompt_cut}
            for k, (x, sc) in enumerate(r.samples)]
    if r.expected is not None:
        for rec in recs:
            rec["expected"] = round(r.expected, 4)
    return recs


def check_run(cfg, old: dict | None = None) -> None:
    """The settings that made RUN (`old`; default RUN/config.json) against this run's: a rerun that would
    skip stages made with other settings (and record the new ones in the manifest) is refused."""
    old = read_json(Path(cfg.run_dir) / "config.json") if old is None else old
    check_settings(cfg.run_dir, type(cfg), old, cli.to_dict(cfg))


def run_stage(r: Recipe, cfg, name: str, t: int, s: Session, rank: int = 0, world: int = 1):
    st = r.stage(name)
    if st.trains:
        s.release()
    return st.run(cfg, t, s, rank, world)


def _timed(r: Recipe, cfg, st: Stage, t: int, s: Session) -> tuple[float, dict | None]:
    t0 = time.perf_counter()
    if st.shards and (cfg.nproc > 1 or nodes.leading()) and not (folder(cfg, t) / st.output).exists():
        s.release()
        cli.launch(None, cfg, r.module, cfg.nproc, Path(cfg.run_dir) / "config.json", "--stage", st.name,
                   "--iter", str(t))
        return round(time.perf_counter() - t0, 2), None
    stats = run_stage(r, cfg, st.name, t, s)
    return round(time.perf_counter() - t0, 2), stats


def run_stages(r: Recipe, cfg, t: int, s: Session, stages: tuple[Stage, ...]) -> dict:
    """The stages of iteration t (0: the head) in order, the manifest written after each -> the last one."""
    timings, stats, m = {}, {}, {}
    for st in (st for st in stages if st.when(cfg)):
        sec, got = _timed(r, cfg, st, t, s)
        stats.update(got or {})
        if st.timed:
            timings[st.name] = sec
        m = r.manifest(cfg, t, timings, stats)
    return m


def run(r: Recipe, cfg, s: Session | None = None, overwrite: bool = False) -> list[dict]:
    """Every stage: the head, then iterations 1..T -> [the head's manifest (if any), iter_1's, ...]. Rerunning
    the same command after a crash continues where it stopped; a rerun with settings that shape the data is
    refused (overwrite: the recipe's layout is deleted first); one driver per RUN. On nodes r > 0 of several
    (nodes.py): the torchruns node 0 starts, joined as node r -> []."""
    if getattr(cfg, "node_rank", 0) > 0:
        nodes.follow(cfg)
        return []
    with output_lock(cfg.run_dir, folder=True), nodes.lead(cfg):
        run_dir, conf = Path(cfg.run_dir), Path(cfg.run_dir) / "config.json"
        if overwrite:
            for pattern in r.layout + ("config.json",):
                for p in run_dir.glob(pattern):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        check_run(cfg)
        s = s or Session(cfg.engine)
        r.prepare(cfg, s)
        if read_json(conf) != cli.to_dict(cfg):
            write_json(conf, cli.to_dict(cfg))
        out = [run_stages(r, cfg, 0, s, r.head)] if r.head else []
        for t in range(1, getattr(cfg, "iterations", 0) + 1):
            out.append(run_stages(r, cfg, t, s, r.body))
            r.report(cfg, t, out[-1])
        return out


def main(r: Recipe, argv: list[str] | None, doc: str, skip: dict):
    """`python -m MODULE`: every stage (one process; --nproc P launches torchrun per sharded stage), or one
    stage of one iteration (--stage S --iter T; under torchrun for a sharded stage)."""
    p = cli.parser(r.config, doc, skip=skip)
    p.add_argument("--stage", default="all", choices=("all",) + tuple(st.name for st in r.head + r.body if st.timed))
    p.add_argument("--iter", type=int, default=1, help="with --stage: the iteration t (ignored for a stage "
                   "that runs once, before the iterations)")
    p.add_argument("--overwrite", action="store_true",
                   help="RUN was made with other settings: delete its stages and start over")
    a = p.parse_args(argv)
    cfg = cli.build(r.config, a)
    rank, world = dist_env()
    if a.stage == "all":
        if world > 1:
            raise cli.ConfigError("run the driver as one process (one per machine, with --nnodes N --node-rank R "
                                  "--rdzv-endpoint HOST:PORT) and pass --nproc P: it launches torchrun per stage")
        return run(r, cfg, overwrite=a.overwrite)
    check_run(cfg)
    st, t = r.stage(a.stage), (0 if r.stage(a.stage) in r.head else a.iter)
    if not st.when(cfg):
        raise cli.ConfigError(f"--stage {a.stage} is off in this run's settings (it is optional: see --help)")
    if world > 1 and not st.shards:
        names = " and ".join(x.name for x in r.head + r.body if x.shards)
        raise cli.ConfigError(f"--stage {a.stage} runs as one process (only {names} shard)")
    with stage_group(cfg.engine.device, world):
        stats = run_stage(r, cfg, a.stage, t, Session(cfg.engine), rank, world)
        return r.manifest(cfg, t, {}, stats) if rank == 0 else None


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
            raise cli.ConfigError(f"--{flag} {getattr(a, flag)}: must be >= 1")
    ecfg = engine_from_flags(a, engine_dests)
    device, dtype = resolve_device(ecfg)
    return a, ecfg, device, str(dtype).removeprefix("torch.")
