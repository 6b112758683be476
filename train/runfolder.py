"""The trainers' run folder, claimed before any work (selfreward.provenance) so a run never silently mixes
with, truncates or replaces another (the rules: train/README.md, "Run folder"). Under torchrun rank 0 claims
it (the other ranks write only after collectives rank 0 joins).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from selfreward.provenance import check_not_input, claim, made_by
from selfreward.cli import to_dict
from selfreward.records import DataError, write_json

def check_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(f"{flag} {folder}: cannot write there ({e.strerror or e}); checked before training") from None


def _clear(out: Path, export: Path) -> None:
    for p in (out / "checkpoints", out / "exports", out / "model"):   # a separate --export is replaced at the end
        shutil.rmtree(p, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


@contextmanager
def claim_run(cfg, name: str):
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
    check_writable(out, "--output")
    check_writable(export.parent, "--export" if cfg.export else "--output")
    made = made_by(cfg)
    with claim(out, made, overwrite=cfg.overwrite, folder=True, clear=lambda: _clear(out, export)):
        write_json(out / "run.json", {"made_by": made, "config": to_dict(cfg)})   # and what ran, whole
        yield
