"""What made an output, and who is writing it: the one place every command claims its outputs.

    with claim(out, made_by={"model": model_fingerprint(m), "input": file_hash(inp), "n": 4, ...},
               inputs=[inp], overwrite=args.overwrite, flag="--overwrite"):
        ...   # write OUT (or OUT.partial); OUT.meta.json already says what makes it

- `output_lock`: a second writer of the same output fails fast. OUT.lock holds its holder's pid, locked with
  fcntl.flock: the kernel drops the lock when the holder dies (the next run takes it over).
- the provenance record (OUT.meta.json beside a file, FOLDER/run.json in a folder): the settings that shape the
  data (`made_by`), the model's fingerprint and the inputs' hashes. A rerun whose record differs is refused
  (it would reuse, append to or truncate data made otherwise) unless given the start-over flag.
- `check_not_input`: a command never writes over one of its own inputs.
"""

import dataclasses
import fcntl
import glob
import hashlib
import itertools
import json
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator

from selfreward.cli import shaping
from selfreward.records import DataError, partial_path, read_json, write_json

MIB = 1 << 20


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files' names and bytes (a `datasets.save_to_disk` input), the
    first 16 hex digits: inputs are small next to the work done on them."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
        if p != path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(4 * MIB), b""):
                h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(path: str | Path) -> str:
    """A checkpoint folder's fingerprint ("" when not a folder): its config and tokenizer files and, per weights
    file, its size, header and first and last MiB; paths are not part of it."""
    path = Path(path)
    if not path.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name in ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "chat_template.jinja") or f.name.endswith(".safetensors.index.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(min(size, 8 + MIB)))
                if size > 2 * MIB:
                    fh.seek(size - MIB)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def made_by(cfg) -> dict:
    """What made an output, by the fields' metadata (cli.passive, checkpoint, input_file): every field that shapes
    the data, a checkpoint as NAME_fingerprint (a list: NAME), an input file as NAME_hash (a list: NAME_hashes)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), f.metadata.get("shapes", True)
        if kind is False or (callable(v) and not dataclasses.is_dataclass(v)):
            continue
        many = isinstance(v, (list, tuple))
        if dataclasses.is_dataclass(v):
            out[f.name] = made_by(v)
        elif kind == "model" and many:
            out[f.name] = [model_fingerprint(x) for x in v]
        elif kind == "model":
            out[f"{f.name}_fingerprint"] = model_fingerprint(v) if v else ""
        elif kind == "file":
            out[f"{f.name}_hashes" if many else f"{f.name}_hash"] = \
                [file_hash(p) if _data(p) else "" for p in v] if many else file_hash(v) if v and _data(v) else ""
        else:
            out[f.name] = list(v) if many else v
    return out


def _data(path: str | Path) -> bool:
    """A data input to hash: a file, or a `datasets.save_to_disk` folder (not any folder: a wrong --data is an
    error after the claim, not a hash of all it holds)."""
    return Path(path).is_file() or (Path(path) / "state.json").is_file()


def meta_path(out: str | Path, folder: bool = False) -> Path:
    out = Path(out)
    return out / "run.json" if folder else out.with_name(out.name + ".meta.json")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs (nested dicts compared leaf by leaf)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def check_settings(where: str | Path, cls, old: dict, new: dict, flag: str | None = "--overwrite") -> None:
    """A run folder's saved config (`old`; {} for a new run) against this run's (`new`), both plain data of
    class `cls`: a difference in a field that shapes the data is an error naming it (and `flag`, if any)."""
    diff = differences(shaping(cls, old), shaping(cls, new)) if old else []
    if diff:
        fix = f"pass {flag} to delete them and start over" if flag else "remove the folder to start over"
        raise DataError(f"{where}: made with other settings ({'; '.join(diff[:6])}); its finished stages would "
                        f"be reused as if made with these: {fix}, or use another --run-dir")


def check_record(out: str | Path, made_by: dict, flag: str, folder: bool = False) -> bool:
    """True when OUT's record equals `made_by`, False when there is none, else an error naming the differences."""
    mp = meta_path(out, folder)
    if not mp.exists():
        return False
    try:
        old = read_json(mp).get("made_by", {})
    except (ValueError, OSError) as e:
        raise DataError(f"{mp}: unreadable provenance record ({e}); remove it or pass {flag}") from None
    diff = differences(old, made_by)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise DataError(f"{out}: made with other settings or inputs ({shown}); refusing to reuse or "
                        f"overwrite it: pass {flag} to start over, or choose another output")
    return True


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_not_input(inputs: Iterable[str | Path], outputs: Iterable[str | Path]) -> None:
    """Refuse a run that would write over one of its inputs (`outputs`: every path the command writes)."""
    for i, o in itertools.product(inputs, outputs):
        if same_file(i, o):
            raise DataError(f"{i}: is also an output of this command ({o}); refusing to write over an input")


@contextmanager
def output_lock(out: str | Path, folder: bool = False) -> Iterator[None]:
    """An exclusive lock on OUT: OUT.lock (FOLDER/.lock for a folder), with the holder's pid in it."""
    out = Path(out)
    path = out / ".lock" if folder else out.with_name(out.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                pid = int(path.read_text().strip() or 0) or "?"
            except (OSError, ValueError):
                pid = "?"
            raise DataError(f"{path}: another run (pid {pid}) is writing this output; "
                            f"wait for it to finish or stop it") from None
        with suppress(FileNotFoundError):   # unless a holder releasing it removed the file meanwhile: retry
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                break
        os.close(fd)
    else:
        raise DataError(f"{path}: could not take the lock (the file keeps being replaced)")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _has_data(out: Path, folder: bool) -> bool:
    if folder or out.is_dir():   # an empty folder (or one with only our record and lock) holds nothing
        return out.is_dir() and any(p.name not in ("run.json", ".lock") for p in out.iterdir())
    return out.exists() or partial_path(out).exists() or any(out.parent.glob(f"{glob.escape(out.name)}.rank*"))


@contextmanager
def claim(out: str | Path, made_by: dict, inputs: Iterable[str | Path] = (), overwrite: bool = False,
          flag: str = "--overwrite", folder: bool = False, clear=None, adopt: bool = True) -> Iterator[bool]:
    """Lock OUT, refuse inputs that are OUT, check OUT's record against `made_by` (different: refused unless
    `overwrite`, which calls `clear()` first), (re)write the record before the body runs (a killed run's partial
    output is labelled) and yield whether it matched. adopt=False: data in OUT without a record is refused too."""
    out = Path(out)
    check_not_input(inputs, [out, partial_path(out)] if not folder else [out])
    with output_lock(out, folder=folder):
        same = False
        if overwrite:
            if clear is not None:
                clear()
            meta_path(out, folder).unlink(missing_ok=True)
        elif _has_data(out, folder):   # a record with no data beside it (a run that failed early) binds nothing
            same = check_record(out, made_by, flag, folder)
            if not same and not adopt:
                raise DataError(f"{out}: exists and this command did not write it (no {meta_path(out, folder).name});"
                                f" refusing to replace it: pass {flag} to replace it, or choose another output")
        if folder:
            out.mkdir(parents=True, exist_ok=True)
        write_json(meta_path(out, folder), {"made_by": made_by})
        yield same
