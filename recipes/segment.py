"""Unlabelled text for instruction backtranslation: reading (JSONL `{"text"}` or plain text, errors naming
file:line), paragraph-aware segmentation and exact + near-duplicate removal (recipes/README.md, step 3).
"""

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from selfreward.records import DataError, check_file, field, iter_jsonl, nonempty


@dataclass
class SegmentConfig:
    min_chars: int = 600              # shorter ones dropped (public notes on the paper; its text: "length filtering")
    max_chars: int = 3000             # longest segment (the same notes)
    near_dup: float = 0.8             # word-shingle Jaccard at or above this is a near duplicate; 0 = off
    shingle: int = 3                  # words per shingle for the near-duplicate test
    max_segments: int = 0             # keep the first N after dedup (0 = all)

    def __post_init__(self):
        if not 1 <= self.min_chars <= self.max_chars:
            from selfreward.cli import ConfigError
            raise ConfigError(f"--segment-min-chars {self.min_chars} must be >= 1 and <= --segment-max-chars "
                              f"{self.max_chars}")


def _line(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def read_documents(paths: list[str]) -> list[tuple[str, str]]:
    """[(where = 'file:line', document text)] from JSONL `{"text"}` or plain-text files."""
    out = []
    for p in paths:
        path = check_file(p)
        data = path.read_bytes()
        if not data.strip():
            raise DataError(f"{p}:1: empty file (no text)")
        nul = data.find(b"\0")
        if nul >= 0:
            raise DataError(f"{p}:{_line(data, nul)}: binary file (a NUL byte), not text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{_line(data, e.start)}: binary file (not UTF-8), not text") from None
        if path.suffix == ".jsonl":
            out += nonempty([(f"{p}:{i}", field(rec, "text", f"{p}:{i}")) for i, rec in iter_jsonl(path)], f"{p}:1")
        else:
            out.append((f"{p}:1", text))
    return out


_SENT = re.compile(r"[.?!][\"')\]]?\s|\n")


def _cut(par: str, max_chars: int) -> list[str]:
    """A paragraph in pieces of at most max_chars, cut at sentence ends, else spaces, else hard."""
    pieces = []
    while len(par) > max_chars:
        head = par[:max_chars + 1]
        ends = [m.end() for m in _SENT.finditer(head) if m.end() <= max_chars]
        at = ends[-1] if ends else head.rfind(" ") + 1 if head.rfind(" ") > 0 else max_chars
        pieces.append(par[:at].strip())
        par = par[at:].strip()
    return pieces + ([par] if par else [])


def segment(text: str, min_chars: int, max_chars: int) -> tuple[list[str], int]:
    """-> (segments within [min_chars, max_chars], how many packed pieces were too short)."""
    pars = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    pieces = [x for p in pars if p for x in _cut(p, max_chars)]
    segs, short, buf = [], 0, ""
    for x in pieces + [None]:
        if x is not None and (not buf or len(buf) + 2 + len(x) <= max_chars):
            buf = f"{buf}\n\n{x}" if buf else x
            continue
        if buf:
            if len(buf) >= min_chars:
                segs.append(buf)
            else:
                short += 1
        buf = x or ""
    return segs, short


def fold(text: str) -> str:
    """Lower case, whitespace collapsed: what an exact duplicate shares (here and in recipes.instruct)."""
    return " ".join(text.lower().split())


def shingles(text: str, n: int) -> frozenset:
    """The n-word shingles of the folded text; a text of fewer words is one shingle."""
    w = fold(text).split(" ")
    return frozenset([" ".join(w)] if len(w) <= n else (" ".join(w[i:i + n]) for i in range(len(w) - n + 1)))


def dedup(segs: list[dict], near_dup: float, n: int) -> tuple[list[dict], dict]:
    """Exact then near-duplicate removal over [{"text", ...}] (first kept) -> (kept, counts)."""
    first: dict[str, dict] = {}
    for s in segs:
        first.setdefault(fold(s["text"]), s)
    exact = list(first.values())                      # in order of first appearance
    if near_dup <= 0:
        return exact, {"exact_duplicates": len(segs) - len(exact), "near_duplicates": 0}
    index: dict[str, list[int]] = defaultdict(list)   # shingle -> kept segments holding it
    kept, sets = [], []
    for s in exact:
        sh = shingles(s["text"], n)
        overlap = Counter(j for g in sh for j in index[g])   # kept segment -> shingles shared
        if any(c / (len(sh) + len(sets[j]) - c) >= near_dup for j, c in overlap.items()):
            continue
        for g in sh:
            index[g].append(len(kept))
        kept.append(s)
        sets.append(sh)
    return kept, {"exact_duplicates": len(segs) - len(exact), "near_duplicates": len(exact) - len(kept)}


def build_segments(paths: list[str], cfg: SegmentConfig) -> tuple[list[dict], dict]:
    """Files -> [{"id", "text", "source"}] and the counts at each step."""
    docs = read_documents(paths)
    segs, short = [], 0
    for where, text in docs:
        s, k = segment(text, cfg.min_chars, cfg.max_chars)
        short += k
        segs += [{"text": x, "source": where} for x in s]
    kept, counts = dedup(segs, cfg.near_dup, cfg.shingle)
    if cfg.max_segments:
        kept = kept[:cfg.max_segments]
    for i, s in enumerate(kept):
        s["id"] = f"s{i}"
    return kept, {"documents": len(docs), "segments": len(segs), "too_short": short, **counts,
                  "kept": len(kept)}
