"""JSONL readers whose errors name file, line and field; atomic writes; resumable appends: a stage appends to
`NAME.partial` as it goes (one flush per unit of work) and renames it to `NAME` when complete; killed, it finds
the file on restart, `read_partial` dropping a torn last line (units.py builds resumable, shardable work on
this). Imports nothing of ours."""

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


def check_file(path: str | Path) -> Path:
    """An input that must be a file: missing, a folder, or something else is an error saying which."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else
                        f"{path}: a folder, not a file" if path.is_dir() else f"{path}: not a regular file")
    return path


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) per non-blank line (of a `.gz` file: of its gunzipped text); errors name the file
    and line."""
    path = check_file(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        try:
            for i, raw in enumerate(f, 1):
                if (rec := _record(path, i, raw)) is not None:
                    yield i, rec
        except (OSError, EOFError, zlib.error) as e:        # gzip: not gzip, cut short, corrupt
            if not isinstance(f, gzip.GzipFile):
                raise
            raise DataError(f"{path}: not a whole gzip file ({e})") from None


def _record(path: Path, i: int, raw: bytes) -> dict | None:
    """Line i's record; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{i}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
    return rec


def read_jsonl(path: str | Path, made_by: str = "") -> list[dict]:
    """The records of `path`; with `made_by` (e.g. "the prompts stage"), a missing file is an error naming it."""
    if made_by and not Path(path).exists():
        raise DataError(f"{path}: missing (run {made_by} first)")
    return [r for _, r in iter_jsonl(path)]


def nonempty(records: list, path: str | Path, what: str = "records") -> list:
    """`records`, or an error when there are none: a command never works on (or trains on) nothing."""
    if not records:
        raise DataError(f"{path}: no {what} (the file is empty)")
    return records


def user_mode(path: str | Path, folder: bool = False) -> None:
    """A file made by mkstemp (0600) or folder by mkdtemp (0700) -> the mode of the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def field(rec: dict, key: str, where: str, types: type | tuple = str) -> Any:
    """rec[key] checked for presence and type; `where` is 'file:line' for the error message."""
    if key not in rec:
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(f"{where}: field '{key}' should be {want}, got {type(v).__name__}")
    return v


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """`text` into a temp file beside `path`, fsync, os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, error: type = DataError) -> Any:
    """The JSON in `path` ({} when the file does not exist); bad JSON or bytes that are not UTF-8 are an
    `error` naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None


def jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    return write_atomic(path, jsonl(records))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def partial_path(path: str | Path) -> Path:
    return (p := Path(path)).with_name(p.name + ".partial")


def read_partial(path: str | Path) -> list[dict]:
    """Records already in `path.partial`; a torn last line (no newline, or bad JSON) is cut off the file."""
    p = partial_path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    recs, pos, end = [], 0, data.rfind(b"\n") + 1      # past the last newline: a torn tail
    for line in data[:end].split(b"\n")[:-1]:
        try:
            if line.strip():
                recs.append(json.loads(line))
        except json.JSONDecodeError:
            if pos + len(line) + 1 < end:
                raise DataError(f"{p}: bad JSON at byte {pos} before the end of the file") from None
            end = pos
        pos += len(line) + 1
    if end < len(data):
        os.truncate(p, end)
    return recs


class PartialWriter(contextlib.AbstractContextManager):   # `with`: itself, closed (not renamed) at the end
    """Appends records to `path.partial`, one flushed write per call; `finish()` renames it to `path`. `keep`
    rewrites the partial file at open to the records it accepts (drops an incomplete unit's records)."""

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
        self._f = open(self.partial, "ab", buffering=0)

    def write(self, records: list[dict]) -> None:
        """Append the records whole or not at all: a failed write (disk full) is cut back off the file, so
        the partial file holds complete units only and a rerun redoes exactly the units not written."""
        if not records:
            return
        data = jsonl(records).encode("utf-8")
        fd = self._f.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as e:   # cut the torn write off now (else read_partial does on the next open)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise OSError(e.errno, f"{self.partial}: writing {len(records)} record(s) failed ({e.strerror}); it "
                          f"keeps the {len(self.records)} complete ones, a rerun continues from there") from None
        self.records.extend(records)

    def finish(self) -> Path:
        self._f.close()
        os.replace(self.partial, self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        self._f.close()


def _write_all(fd: int, data: bytes) -> None:   # the one place appends go through (tests make it fail)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
