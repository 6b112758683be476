"""What long work shows on the terminal: the one progress line every long stage prints (units.run_units uses
it) and the reports' tables. Imports nothing of ours."""

import sys
import time


class Progress:
    """One updating line on stderr: units done of total, tokens/s, ETA (on a terminal the line is rewritten
    in place; in a log, a line at most every `every` seconds and at the end)."""

    def __init__(self, label: str, total: int, done: int = 0, unit: str = "units", every: float = 2.0):
        self.label, self.total, self.done, self.unit, self.every = label, total, done, unit, every
        self.start_done, self.tokens, self.t0, self.last = done, 0, time.perf_counter(), 0.0
        self.tty, self.pending = sys.stderr.isatty(), False

    def update(self, units: int = 1, tokens: int = 0, note: str = "") -> None:
        """`units` more done (`tokens` more made); `note` (a trainer's loss) is shown after the count."""
        self.done, self.tokens = self.done + units, self.tokens + tokens
        now = time.perf_counter()
        if now - self.last < (0.2 if self.tty else self.every) and self.done < self.total:
            return
        self.last, el = now, max(now - self.t0, 1e-9)
        rate = (self.done - self.start_done) / el
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = f"[{self.label}] {self.done}/{self.total} {self.unit}" + (f" {note}" if note else "") + \
            (f", {self.tokens / el:.1f} tok/s" if self.tokens else f", {rate:.2f} {self.unit}/s") + f", ETA {eta:.0f}s"
        end = "\n" if not self.tty or self.done >= self.total else ""
        print(("\r\033[K" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
        self.pending = not end

    def clear(self) -> None:
        """On a terminal, the line being updated is wiped (another line is printed in its place); the next
        update draws it again at once."""
        if self.pending:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
            self.pending, self.last = False, 0.0


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A text table of `rows`: columns (key, heading, format), right-aligned; a missing value is '-'."""
    cells = [[h for _, h, _ in columns]] + [["-" if r.get(k) is None else f.format(r[k]) for k, _, f in columns]
                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(c, widths)) for c in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])
