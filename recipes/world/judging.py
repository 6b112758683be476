"""The world's compact judge: a rubric template and the judgments the EFT seed teaches.

A small model cannot judge by writing a score straight away (it answers one score whatever it sees), nor by
writing the expected answer and then comparing (the comparison is non-local). What it can do is make every
comparison local: for each answer position it writes the candidate's symbol, the expected symbol and a
match mark, and only then the score:

    Task: What is 23 plus 45?   Answer: 69      ->   6 6 + 9 8 - Score: 1

Score 5 when every position matches and the lengths agree, else 1. A missing position is written `_`.
The template is passed to the loop through the same `--judge-template` file users pass for a real rubric.
"""
from __future__ import annotations

from pathlib import Path

from recipes.world.checker import is_correct, symbols
from recipes.world.tasks import Task

JUDGE_TEMPLATE = "Judge. Task: {instruction} Answer: {response} Score 5 if every symbol matches, else 1."
GOOD, BAD = 5, 1


def write_template(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JUDGE_TEMPLATE)
    return path


def judge_prompt(instruction: str, response: str) -> str:
    return JUDGE_TEMPLATE.format(instruction=instruction, response=response)


def judgment(task: Task, response: str, believed: str | None = None) -> str:
    """The reference judgment of `response`: per-position comparison, then `Score: n` (agrees with the checker).
    `believed` replaces the true answer (the imperfect graders of the web text)."""
    got, want = symbols(response), symbols(task.answer if believed is None else believed)
    steps = []
    for i in range(max(len(got), len(want))):
        g = got[i] if i < len(got) else "_"
        w = want[i] if i < len(want) else "_"
        steps.append(f"{g} {w} {'+' if g == w else '-'}")
    score = GOOD if got == want else BAD
    return " ".join(steps + [f"Score: {score}"])


def reference_score(task: Task, response: str) -> int:
    return GOOD if is_correct(task, response) else BAD
