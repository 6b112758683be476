"""The world's compact judge: a rubric template and the judgments the EFT seed teaches.

A small model cannot judge by writing a score straight away (it answers one score whatever it sees), nor by
writing the expected answer and then comparing (the comparison is non-local). What it can do is make every
comparison local: for each answer position it writes the candidate's symbol, the expected symbol and a
match mark, and only then the score:

    Task: What is 23 plus 45?   Answer: 69      ->   6 6 + 9 8 - Score: 1

Score 5 when every position matches and the lengths agree, else 1. A missing position is written `_`.
The template is passed to the loop through the same `--judge-template` file users pass for a real rubric.

That format ("answer", above) makes judging exactly as hard as solving: the expected symbol is the answer.
The default format ("check") makes checking cheaper than solving: every step is a local verification of
the candidate against the visible input, with no answer computed first:

    sort     each adjacent pair of the candidate in order, each input digit present as often, lengths
             Sort: 3 1 2   Answer: 1 3 2   ->   1 3 + 3 2 - 3 + 1 + 2 + 3 3 + Score: 1
    reverse  candidate[i] against input[n-1-i] (a copy with an index; the same steps as "answer")
    max      the candidate against each input number: '+' greater, '=' equal, '-' smaller (5: no '-', one '=')
             Largest: 7, 81, 30   Answer: 81   ->   81 7 + 81 81 = 81 30 + Score: 5
    min      the same marks (5: no '+', one '=')
    count    a running count over the input letters, then the candidate against the count
             How many b in: b a b?   Answer: 2   ->   b 1 a 1 b 2 2 2 + Score: 5
    add      digit-wise from the right: operand digits, carry in, candidate digit, mark
             23 + 45   Answer: 69   ->   3 5 0 9 - 2 4 0 6 + Score: 1
"""
from __future__ import annotations

from pathlib import Path

from selfreward.recipes.world.checker import symbols
from selfreward.recipes.world.tasks import Task

JUDGE_TEMPLATE = "Judge. Task: {instruction} Answer: {response} Score 5 if every symbol matches, else 1."
GOOD, BAD = 5, 1
FORMATS = ("check", "answer")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"judge format must be one of {FORMATS}, not {fmt!r}")
    return fmt


def write_template(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JUDGE_TEMPLATE)
    return path


def judge_prompt(instruction: str, response: str) -> str:
    return JUDGE_TEMPLATE.format(instruction=instruction, response=response)


def judgment(task: Task, response: str, believed: str | None = None, fmt: str = "check") -> str:
    """The reference judgment of `response`: its steps, then `Score: n` (agrees with the checker).
    `believed` replaces the true answer (the imperfect graders of the web text; "answer" format only)."""
    if check_format(fmt) == "check":
        return _render(check_steps(task, response), task.kind)
    got, want = symbols(response), symbols(task.answer if believed is None else believed)
    steps = []
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else "_"
        w = want[i] if i < len(want) else "_"
        steps.append(f"{g} {w} {'+' if g == w else '-'}")
    score = GOOD if got == want else BAD
    return " ".join(steps + [f"Score: {score}"])


# ---- the "check" format: local verification steps -------------------------------------------------------

def check_steps(task: Task, response: str) -> list[tuple[str, str | None]]:
    """[(step text, mark)]: mark '+' / '=' pass, '-' fail, None for a step that is bookkeeping only."""
    c = symbols(response)
    steps: list[tuple[str, str | None]] = []
    if task.kind == "sort":
        xs = [str(x) for x in task.args]
        for i in range(len(c) - 1):
            ok = c[i].isdigit() and c[i + 1].isdigit() and c[i] <= c[i + 1]
            steps.append((f"{c[i]} {c[i + 1]}", "+" if ok else "-"))
        for x in xs:
            steps.append((x, "+" if c.count(x) == xs.count(x) else "-"))
        steps.append((f"{len(c)} {len(xs)}", "+" if len(c) == len(xs) else "-"))
    elif task.kind == "reverse":
        xs = list(task.args)
        n = len(xs)
        for i in range(max(len(c), n)):
            g = c[i] if i < len(c) else "_"
            w = xs[n - 1 - i] if i < n else "_"
            steps.append((f"{g} {w}", "+" if g == w else "-"))
    elif task.kind in ("max", "min"):
        v = "".join(c)
        valid = v.isdigit() and (len(v) == 1 or v[0] != "0")
        for a in task.args:
            if not valid:
                steps.append((f"_ {a}", "-"))
            else:
                steps.append((f"{v} {a}", "+" if int(v) > a else "=" if int(v) == a else "-"))
    elif task.kind == "count":
        x, xs = task.args
        k = 0
        for letter in xs:
            k += letter == x
            steps.append((f"{letter} {k}", None))
        v = "".join(c) or "_"
        steps.append((f"{v} {k}", "+" if v == str(k) else "-"))
    elif task.kind == "add":
        a, b = task.args
        ans = str(a + b)[::-1]
        ad, bd, cr = str(a)[::-1], str(b)[::-1], c[::-1]
        carry = 0
        for i in range(max(len(ans), len(cr))):
            ai = int(ad[i]) if i < len(ad) else 0
            bi = int(bd[i]) if i < len(bd) else 0
            ci = cr[i] if i < len(cr) else "_"
            want = ans[i] if i < len(ans) else "_"
            steps.append((f"{ai} {bi} {carry} {ci}", "+" if ci == want else "-"))
            carry = (ai + bi + carry) // 10
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    return steps


FAIL_MARK = {"min": "+"}          # the mark that fails a check; '-' for every other kind


def _score(steps: list[tuple[str, str | None]], kind: str) -> int:
    marks = [m for _, m in steps if m is not None]
    ok = FAIL_MARK.get(kind, "-") not in marks and (kind not in ("max", "min") or "=" in marks)
    return GOOD if ok else BAD


def _render(steps: list[tuple[str, str | None]], kind: str) -> str:
    parts = [t if m is None else f"{t} {m}" for t, m in steps]
    return " ".join(parts + [f"Score: {_score(steps, kind)}"])


def noisy_judgment(task: Task, response: str, rng, p_right: float, fmt: str = "check") -> str:
    """A web grader's judgment, right about `p_right` of the time. "answer": compares against its own,
    sometimes wrong, idea of the answer; "check": with probability 1 - p_right one mark of its checks is
    flipped (and the score follows the marks)."""
    if check_format(fmt) == "answer":
        believed = task.answer if rng.random() < p_right else _corrupt(task.answer, rng)
        return judgment(task, response, believed=believed, fmt="answer")
    steps = check_steps(task, response)
    if rng.random() >= p_right:
        idx = [i for i, (_, m) in enumerate(steps) if m is not None]
        i = rng.choice(idx)
        t, m = steps[i]
        if task.kind in ("max", "min"):
            steps[i] = (t, rng.choice([x for x in "+=-" if x != m]))
        else:
            steps[i] = (t, "-" if m == "+" else "+")
    return _render(steps, task.kind)


def _corrupt(answer: str, rng) -> str:
    from selfreward.recipes.world.tasks import corrupt
    return corrupt(answer, rng)
