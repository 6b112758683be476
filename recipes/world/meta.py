"""The world's meta-judge (issue 35): checking the checks. Shown a task, an answer and two judgments of it
(recipes/world/judging.py's check format), the meta-judge checks their steps locally and names the better
one. For max and min it walks the task's input numbers in order and marks, for each judgment, whether it
holds the right step for that number, then the right score with a mark for each; the judgment with fewer
`-` is named:

    Task: Which is smallest: 7, 81, 5?  Answer: 5
    First: 5 7 - 5 81 - 5 5 = Score: 5      Second: 5 7 - 5 8 - 5 5 = Score: 5
    ->  7 + + 81 + - 5 + + Score: 5 + + Pick: 1

Other kinds: the steps the two share, the right step where they first differ (or the score, where only the
scores differ), and the name of the one that has it. The template goes to the loop as `--meta-template`, the
mechanism a user's own meta-judge prompt takes, with `--meta-label Pick --meta-choices 1,2`: the world's
tokenizer has no `B` (nor `M`), so the loop's default `Better: A|B` would reach this model as unknown pieces.
"""
from __future__ import annotations

import random
from pathlib import Path

from selfreward.recipes.world.judging import _render, check_steps, judgment
from selfreward.recipes.world.tasks import Task, sample_tasks

META_TEMPLATE = ("Recheck. Task: {instruction} Answer: {response} First: {judgment_a} Second: {judgment_b} "
                 "Pick the right one.")
LABEL, CHOICES = "Pick", "1,2"
MARKS = ("+", "=", "-")


def meta_prompt(instruction: str, response: str, a: str, b: str) -> str:
    return META_TEMPLATE.format(instruction=instruction, response=response, judgment_a=a, judgment_b=b)


def steps_of(judgment_text: str) -> list[str]:
    """A judgment's steps, each ending at its mark, then its `Score: ...` (whatever follows the label)."""
    toks, out, cur = judgment_text.split(), [], []
    for i, x in enumerate(toks):
        if x == "Score:":
            out += [" ".join(cur)] if cur else []
            return out + [" ".join(toks[i:])]
        cur.append(x)
        if x in MARKS:
            out.append(" ".join(cur))
            cur = []
    return out + ([" ".join(cur)] if cur else [])


def first_difference(a: str, b: str) -> int | None:
    """The index of the first step where judgments a and b differ (None: the same steps)."""
    sa, sb = steps_of(a), steps_of(b)
    for i in range(max(len(sa), len(sb))):
        if (sa[i] if i < len(sa) else None) != (sb[i] if i < len(sb) else None):
            return i
    return None


def meta_judgment(task: Task, response: str, a: str, b: str) -> str | None:
    """The reference meta-judgment of judgments a and b of `response`; None when it names neither (the same
    number of wrong steps). max and min: per input number, in the task's order, the number and a mark for each
    judgment (`+`: it holds the right step for that number, `-`: it does not), then the right score with a mark
    for each judgment's score; the judgment with fewer `-` is named (`Pick: 1|2`, the first or the second
    shown). Other kinds: the shared steps, the right step where the two first differ, and the name of the one
    that has it."""
    ref = steps_of(judgment(task, response))
    sa, sb = steps_of(a), steps_of(b)
    if task.kind in ("max", "min"):
        out, bad = [], [0, 0]
        for x, step in zip(task.args, ref[:-1]):
            marks = ["+" if step in s[:-1] else "-" for s in (sa, sb)]
            out.append(f"{x} {marks[0]} {marks[1]}")
        marks = ["+" if s and s[-1] == ref[-1] else "-" for s in (sa, sb)]
        out.append(f"{ref[-1]} {marks[0]} {marks[1]}")
        for item in out:
            bad[0] += item.endswith("- +") or item.endswith("- -")
            bad[1] += item.endswith("+ -") or item.endswith("- -")
        if bad[0] == bad[1]:
            return None
        return " ".join(out + [f"{LABEL}: {'1' if bad[0] < bad[1] else '2'}"])
    i = first_difference(a, b)
    if i is None:
        return None
    right = ref[i] if i < len(ref) else "_"
    ga, gb = (sa[i] if i < len(sa) else None), (sb[i] if i < len(sb) else None)
    if (ga == right) == (gb == right):
        return None
    return " ".join(sa[:i] + [right, f"{LABEL}: {'1' if ga == right else '2'}"])


def reference_verdict(task: Task, response: str, a: str, b: str) -> str | None:
    """The loop's verdict ("A": the first shown, "B": the second) of the reference meta-judgment; None when it
    names neither."""
    from selfreward.recipes.meta_judge import parse_verdict
    m = meta_judgment(task, response, a, b)
    return None if m is None else parse_verdict(m, LABEL, tuple(CHOICES.split(",")))


def slipped_judgment(task: Task, response: str, rng: random.Random) -> str | None:
    """A wrong judgment of the kinds the judge writes: one mark flipped, one input copied wrong (max and min:
    a neighbouring input, the candidate, or a number 1-3 away, the mark then following the wrong number), or
    one step skipped; the score follows the marks. None if it came out right."""
    steps = check_steps(task, response)
    marked = [i for i, (_, m) in enumerate(steps) if m is not None]
    how = rng.choice(("flip", "copy", "skip") if task.kind in ("max", "min") else ("flip", "skip"))
    i = rng.choice(marked)
    text, mark = steps[i]
    if how == "flip":
        choices = [x for x in MARKS if x != mark] if task.kind in ("max", "min") else ["-" if mark == "+" else "+"]
        steps[i] = (text, rng.choice(choices))
    elif how == "copy":
        v, a = text.split()
        args = list(task.args)
        pool = [args[j] for j in (i - 1, i + 1) if 0 <= j < len(args)] + [int(a) + d for d in (-3, -2, -1, 1, 2, 3)]
        if v.isdigit():
            pool.append(int(v))
        wrong = rng.choice([x for x in pool if 0 <= x < 100 and x != int(a)])
        m = "_" if not v.isdigit() else "+" if int(v) > wrong else "=" if int(v) == wrong else "-"
        steps[i] = (f"{v} {wrong}", "-" if m == "_" else m)
    else:
        del steps[i]
    wrong_text = _render(steps, task.kind)
    return None if wrong_text == judgment(task, response) else wrong_text


def meta_seed(n: int, seed: int, kinds, candidate) -> list[dict]:
    """n meta-judge examples {"prompt", "response", "kind"}: train-split tasks, a candidate drawn by
    `candidate(task, rng)` (the EFT seed's), its reference judgment against a slipped one in a random order."""
    rng = random.Random(f"meta:{seed}")
    out = []
    for t in sample_tasks(4 * n, seed=60_000 + seed, kinds=kinds):
        cand = candidate(t, rng)
        right, wrong = judgment(t, cand), slipped_judgment(t, cand, rng)
        if wrong is None:
            continue
        a, b = (right, wrong) if rng.random() < 0.5 else (wrong, right)
        target = meta_judgment(t, cand, a, b)
        if target is None:
            continue
        out.append({"prompt": meta_prompt(t.prompt, cand, a, b), "response": target, "kind": t.kind})
        if len(out) == n:
            break
    return out


def write_meta_template(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(META_TEMPLATE)
    return path


def write_meta_seed(path: Path, mix: Path, eft: Path, n: int, seed: int, kinds, close: float) -> None:
    """RUN/seed/meta.jsonl (n examples, candidates as the EFT seed's with its `close`) and RUN/seed/eft_meta.jsonl
    (the EFT seed and these: what --eft-mix mixes into DPO when the loop meta-judges)."""
    from selfreward.recipes.world.data import eft_candidate
    from selfreward.records import read_jsonl, write_jsonl
    recs = meta_seed(n, seed, kinds, lambda t, rng: eft_candidate(t, rng, close=close))
    write_jsonl(path, recs)
    write_jsonl(mix, read_jsonl(eft) + recs)
