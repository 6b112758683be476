"""The run folder: claimed before any work (selfreward.provenance; rank 0 claims it, the other ranks write only
after collectives rank 0 joins), checkpoints that resume exactly, the rule that only good weights are kept, and
the Hugging Face export. The rules, layout and atomicity: train/README.md, "Run folder".
"""

import json
import math
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from selfreward.cli import Stopped, to_dict
from selfreward.model.checkpoint import save_model
from selfreward.provenance import check_not_input, claim, made_by
from selfreward.records import DataError, write_atomic, write_json
from selfreward.train.parallel import Dist, all_reduce, barrier

EXPLODED = 1000.0   # weights whose largest |w| grew past this many times the starting one's have blown up


def _clear(out: Path) -> None:
    for p in (out / "checkpoints", out / "exports", out / "model"):   # a separate --export is replaced at the end
        shutil.rmtree(p, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


@contextmanager
def claim_run(cfg):
    out = Path(cfg.output)
    export = Path(cfg.export or out / "model")
    check_not_input([cfg.model] + ([cfg.tokenizer] if cfg.tokenizer else []), [out, export])
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    old = [p.name for p in (out / "checkpoints", out / "metrics.jsonl") if p.exists()]
    if old and not cfg.resume and not cfg.overwrite:
        raise DataError(f"{out}: holds an earlier run ({', '.join(old)}); pass --resume to continue it, "
                        f"--overwrite to start over, or choose another --output")
    for folder, flag in ((out, "--output"), (export.parent, "--export" if cfg.export else "--output")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise DataError(f"{flag} {folder}: cannot write there ({e.strerror or e}); checked before training") from None
    made = made_by(cfg)
    with claim(out, made, overwrite=cfg.overwrite, folder=True, clear=lambda: _clear(out)):
        write_json(out / "run.json", {"made_by": made, "config": to_dict(cfg)})   # and what ran, whole
        yield


class TrainingStopped(Stopped):
    """A non-finite loss, gradient or weights: stopped before the update (train/README.md, "Run folder")."""


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Oldest first; trainer_state.json is written last."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").exists()) if root.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; when that one is incomplete or missing, the newest complete one."""
    ptr = Path(run_dir) / "checkpoints" / "latest"
    p = ptr.parent / ptr.read_text().strip() if ptr.exists() else None
    if p is None or (p / "trainer_state.json").exists():
        return p
    done = complete_checkpoints(run_dir)
    print(f"[checkpoint] {ptr}: points to {p.name}, which is incomplete or missing; "
          f"{'using ' + done[-1].name if done else 'no complete checkpoint: starting from step 0'}", flush=True)
    return done[-1] if done else None


def stop(msg: str, run_dir: Path, step: int, d: Dist) -> None:
    """Remove the checkpoints of step >= `step` (the weights that led here), point `latest` at the newest one
    left, raise TrainingStopped(msg + that checkpoint)."""
    if d.is_main:
        root = run_dir / "checkpoints"
        for p in complete_checkpoints(run_dir):
            if int(p.name.split("_")[1]) >= step:
                shutil.rmtree(p, ignore_errors=True)
        left = complete_checkpoints(run_dir)
        if left:
            write_atomic(root / "latest", left[-1].name + "\n")
        else:
            (root / "latest").unlink(missing_ok=True)
    barrier(d)
    left = complete_checkpoints(run_dir)
    raise TrainingStopped(f"{msg}; last good checkpoint: {left[-1] if left else 'none (nothing good saved)'}")


def weight_scale(model, d: Dist) -> float:
    """max |w| over every parameter of every rank (inf when any is not finite)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    vals = [float(t.detach().abs().max()) for t in local if t.numel()]
    m = max((math.inf if math.isnan(v) else v for v in vals), default=0.0)
    return float(all_reduce(torch.tensor([m]), d, dist.ReduceOp.MAX))


def check_finite(model, d: Dist, out: Path, step: int, name: str, start_scale: float) -> None:
    """Before a checkpoint or export: every weight finite and not blown up (EXPLODED x the starting max |w|)."""
    scale = weight_scale(model, d)
    if not math.isfinite(scale) or scale > EXPLODED * max(start_scale, 1.0):
        stop(f"[{name}] weights {'not finite' if not math.isfinite(scale) else 'exploded'} after step {step} (max "
             f"|w| {scale:.3g}, {start_scale:.3g} at the start): not saved", out, step, d)


def _dcp(fn, model, optimizer, path: Path) -> dict:
    """dcp.save / dcp.load of {"model", "optim"} state dicts -> them; a Ctrl-C or an OS error (a full disk) raised
    as itself, not in DCP's CheckpointException (a traceback as its text), so the entry point says it in one line."""
    state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    with warnings.catch_warnings():   # single process: DCP warns that it saves without a process group
        warnings.simplefilter("ignore", UserWarning)
        try:
            fn(state, checkpoint_id=str(path))
        except CheckpointException as e:
            first = next(iter(e.failures.values()), (None,))[0]
            while first is not None and not isinstance(first, (KeyboardInterrupt, OSError)):
                first = first.__cause__ or first.__context__   # e.g. torch.save's zip writer failing on
            if first is not None:                              # its way out of a Ctrl-C
                raise first from None
            raise
    return state


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict, d: Dist,
                    keep: int = 2) -> None:
    """Every rank writes checkpoints/.tmp-step_N/, which rank 0 renames into place (train/README.md, "Run folder")."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)   # leftovers of a crash during an earlier write
        tmp.mkdir(parents=True)
    barrier(d)
    _dcp(dcp.save, model, optimizer, tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(rng | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
               tmp / f"rng_{d.rank}.pt")
    if d.is_main:
        full = dict(state, step=step, world=d.world, scheduler=scheduler.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(full, indent=1))
    barrier(d)
    if d.is_main:
        shutil.rmtree(root / name, ignore_errors=True)
        os.rename(tmp, root / name)
        write_atomic(root / "latest", name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.name != name)
        for p in old[:max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier(d)


def load_checkpoint(path: Path, model, optimizer, scheduler, d: Dist) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; -> the trainer state dict."""
    state = json.loads((path / "trainer_state.json").read_text())
    both = _dcp(dcp.load, model, optimizer, path)
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng_{d.rank}.pt"
    if state.get("world") == d.world and rng.exists():
        rng = torch.load(rng, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif d.is_main:
        print(f"[checkpoint] {path}: saved with {state.get('world')} ranks, resuming with {d.world}: "
              f"RNG streams (dropout) are not restored")
    return state


def export_model(model, out: str | Path, tokenizer_dir: str | Path | None, d: Dist, hf_config: dict | None = None,
                 dtype: torch.dtype | None = None):
    """The full weights gathered on rank 0, written by model.checkpoint.save_model, the one writer (`hf_config`:
    the reward model's config fields; `dtype`: --export-dtype's, the fp32 master weights cast as they are written)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_model(sd, model.cfg, out, tokenizer_dir=tokenizer_dir, hf_config=hf_config, dtype=dtype)
    barrier(d)
