"""JSONL I/O shared by every floor (infer/, train/, recipes/): readers whose errors name file, line and
field; atomic writes; resumable appends. It sits in model/ because that is the lowest floor all of them
import (infer/ and train/ never import each other).

A stage writes its records to `NAME.partial` as it goes (one flush per unit of work) and renames the
file to `NAME` when the stage is complete. A stage that was killed finds the `.partial` file on restart:
`read_partial` drops a torn last line (the kill can land mid-write), the stage works out which units are
complete, and continues with the rest, so nothing is lost or duplicated.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def read_jsonl(path: str | Path) -> list[dict]:
    return [r for _, r in iter_jsonl(path)]


def field(rec: dict, key: str, where: str, types: type | tuple = str) -> Any:
    """rec[key] checked for presence and type; `where` is 'file:line' for the error message."""
    if key not in rec:
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(f"{where}: field '{key}' should be {want}, got {type(v).__name__}")
    return v


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    return write_atomic(path, "".join(dumps(r) + "\n" for r in records))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def read_partial(path: str | Path) -> list[dict]:
    """Records already in `path.partial` (empty if none). A last line without its newline or not valid
    JSON is a write torn by a kill: it is cut off the file so the next append starts clean."""
    p = partial_path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    recs, good_end, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn tail
        line = data[pos:nl]
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if data.find(b"\n", nl + 1) >= 0:
                raise DataError(f"{p}: bad JSON at byte {pos} before the end of the file") from None
            break
        if rec is not None:
            recs.append(rec)
        pos = good_end = nl + 1
    if good_end < len(data):
        with open(p, "r+b") as f:
            f.truncate(good_end)
    return recs


class PartialWriter:
    """Appends records to `path.partial`, one flushed write per call; `finish()` renames it to `path`.

    `keep` (optional) rewrites the partial file at open to the records it accepts: a stage uses it to drop
    the records of an incomplete unit (say 2 of a prompt's 4 candidates) before redoing that unit."""

    def __init__(self, path: str | Path, keep: Callable[[list[dict]], list[dict]] | None = None):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_partial(self.path)
        if keep is not None:
            kept = keep(self.records)
            if len(kept) != len(self.records):
                write_jsonl(self.partial, kept)
            self.records = kept
        self._f = open(self.partial, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self._f.write("".join(dumps(r) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.extend(records)

    def finish(self) -> Path:
        self._f.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "PartialWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
