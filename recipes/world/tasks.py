"""The embedded world: instruction-following tasks whose answers a program can check.

Six task kinds, each with several surface forms (templates), so the model must read the instruction rather
than pattern-match one phrasing:

    add      two numbers under 100                      "What is 23 plus 45?"        -> "68"
    max      the largest of five numbers under 100      "Which is largest: 7, 81, 30, 5, 62?" -> "81"
    min      the smallest of five numbers under 100     "Which is smallest: 7, 81, 30, 5, 62?" -> "5"
    sort     five digits in ascending order             "Sort these digits: 5 1 4"   -> "1 4 5 ..."
    reverse  five letters a-h in reverse order          "Reverse: c a b e d"         -> "d e b a c"
    count    how often a letter occurs in six letters   "How many b in: b a b c d b?" -> "3"

The world in use is a subset (`parse_kinds`, the demo's `--m0-kinds`), passed down to every generator. The default, DEFAULT_KINDS, holds the
kinds whose judge's check is cheaper than solving for a small model: for max and min a comparison of the
candidate with each input number (solving compares all five at once), for sort adjacent pairs in order. For
add and count the check itself needs the computation (digit sums with carries, a running count) the model
cannot do, and measured runs showed its judgments there no better than chance (recipes/world/README.md).

Answers are short and written token by token (digits of a number, letters and digits of a list separated by
spaces) so that every answer position is one token of the world's tokenizer.

The split is by the task *instance* (kind + arguments), not by the wording: an instance whose hash falls in
the held-out bucket is never produced by the training generators, whatever template is drawn. Evaluation
prompts come only from that bucket.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

KINDS = ("add", "max", "min", "sort", "reverse", "count")
DEFAULT_KINDS = ("max", "min", "sort")
# how many numbers (max, min), digits (sort), letters (reverse, count) an instance has: the world's sizes
SIZES = {"add": 2, "max": 8, "min": 8, "sort": 8, "reverse": 5, "count": 6}
# the short-list world M0's pretraining starts from (recipes/world/build.py: the first phase of its curriculum)
BASE_SIZES = {"add": 2, "max": 5, "min": 5, "sort": 5, "reverse": 5, "count": 6}


def parse_kinds(kinds) -> tuple[str, ...]:
    """The world's task kinds from a tuple or a comma-separated string, checked."""
    ks = tuple(k.strip() for k in kinds.split(",")) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in ks if k not in KINDS]
    if bad or not ks:
        raise ValueError(f"unknown task kinds {bad or ks!r}: choose from {KINDS}")
    return ks
LETTERS = "abcdefgh"
HELD_OUT_BUCKETS = 5          # 1 in 5 instances is held out

TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "Give the sum of {a} and {b}."),
    "max": ("Which is largest: {ns}?", "Give the biggest number of {nsp}.", "Find the maximum of {ns}.",
            "What is the largest of {nsp}?"),
    "min": ("Which is smallest: {ns}?", "Give the least number of {nsp}.", "Find the minimum of {ns}.",
            "What is the smallest of {nsp}?"),
    "sort": ("Sort these digits: {xs}", "Put in ascending order: {xs}", "Order from small to large: {xs}",
             "Write {xs} sorted."),
    "reverse": ("Reverse: {xs}", "Write these letters backwards: {xs}", "Give {xs} in reverse order.",
                "Flip the order of {xs}"),
    "count": ("How many {x} in: {xs}?", "Count the letter {x} in {xs}.", "How often does {x} occur in {xs}?",
              "Number of {x} in {xs}?"),
}


@dataclass(frozen=True)
class Task:
    kind: str
    args: tuple                # canonical arguments: ints for add/max, a tuple of digits/letters otherwise
    prompt: str                # the instruction as the model sees it (one of the kind's templates)

    @property
    def key(self) -> str:
        """The instance identity (wording excluded): what the held-out split is made over."""
        return f"{self.kind}:{self.args!r}"

    @property
    def answer(self) -> str:
        return solve(self.kind, self.args)


def solve(kind: str, args: tuple) -> str:
    if kind == "add":
        return str(args[0] + args[1])
    if kind == "max":
        return str(max(args))
    if kind == "min":
        return str(min(args))
    if kind == "sort":
        return " ".join(str(d) for d in sorted(args))
    if kind == "reverse":
        return " ".join(reversed(args))
    if kind == "count":
        x, xs = args
        return str(xs.count(x))
    raise ValueError(f"unknown task kind {kind!r}")


def is_held_out(key: str) -> bool:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return h % HELD_OUT_BUCKETS == 0


def draw_args(kind: str, rng: random.Random, sizes: dict | None = None) -> tuple:
    n = (sizes or SIZES)[kind]
    if kind == "add":
        return (rng.randrange(100), rng.randrange(100))
    if kind in ("max", "min"):
        return tuple(rng.randrange(100) for _ in range(n))
    if kind == "sort":
        return tuple(rng.randrange(10) for _ in range(n))
    if kind == "reverse":
        return tuple(rng.choice(LETTERS) for _ in range(n))
    if kind == "count":
        xs = tuple(rng.choice(LETTERS[:4]) for _ in range(n))
        return (rng.choice(LETTERS[:4]), xs)
    raise ValueError(f"unknown task kind {kind!r}")


def render(kind: str, args: tuple, template: int) -> str:
    t = TEMPLATES[kind][template % len(TEMPLATES[kind])]
    if kind == "add":
        return t.format(a=args[0], b=args[1])
    if kind in ("max", "min"):
        return t.format(ns=", ".join(map(str, args)), nsp=" ".join(map(str, args)))
    if kind == "count":
        return t.format(x=args[0], xs=" ".join(args[1]))
    return t.format(xs=" ".join(str(v) for v in args))


def draw(rng: random.Random, split: str = "train", kinds: tuple[str, ...] = DEFAULT_KINDS,
         sizes: dict | None = None) -> Task:
    """One task instance from `split` ("train" or "heldout"), uniform over kinds and templates."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_held = split == "heldout"
    kind = rng.choice(kinds)
    while True:
        args = draw_args(kind, rng, sizes)
        task = Task(kind, args, render(kind, args, rng.randrange(len(TEMPLATES[kind]))))
        if is_held_out(task.key) == want_held:
            return task


def sample_tasks(n: int, seed: int, split: str = "train", unique: bool = True,
                 kinds: tuple[str, ...] = DEFAULT_KINDS, sizes: dict | None = None) -> list[Task]:
    """n tasks of `kinds`; with `unique`, no two share an instance key (sizes
    here are far below each kind's space)."""
    rng = random.Random(f"{split}:{seed}")
    out, seen = [], set()
    while len(out) < n:
        t = draw(rng, split, kinds, sizes)
        if unique and t.key in seen:
            continue
        seen.add(t.key)
        out.append(t)
    return out


def heldout_eval_set(n: int, seed: int = 1234, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[Task]:
    """The fixed evaluation prompts: held-out instances, balanced over kinds."""
    per, rem = divmod(n, len(kinds))
    rng = random.Random(f"eval:{seed}")
    out, seen = [], set()
    for i, kind in enumerate(kinds):
        want = per + (1 if i < rem else 0)
        while want:
            t = draw(rng, "heldout", kinds=(kind,))
            if t.key not in seen:
                seen.add(t.key)
                out.append(t)
                want -= 1
    rng.shuffle(out)
    return out


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one token changed, dropped, added, or two tokens swapped."""
    toks = answer.split(" ") if " " in answer else list(answer)
    sep = " " if " " in answer else ""
    alphabet = "0123456789" if all(t.isdigit() for t in toks) else LETTERS
    while True:
        t = list(toks)
        op = rng.choice(("change", "change", "drop", "add", "swap"))
        i = rng.randrange(len(t))
        if op == "change":
            t[i] = rng.choice(alphabet)
        elif op == "drop" and len(t) > 1:
            del t[i]
        elif op == "add":
            t.insert(i, rng.choice(alphabet))
        elif op == "swap" and len(t) > 1:
            j = (i + 1) % len(t)
            t[i], t[j] = t[j], t[i]
        out = sep.join(t)
        if out != answer and (sep or not (len(out) > 1 and out[0] == "0")):
            return out
