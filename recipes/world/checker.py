"""The world's checker: reads any instruction back into its task and scores any response.

A response is correct when its non-space characters are exactly the answer's (the digits of the number, or
the list's items in order; spacing is ignored). Anything else (a wrong value, extra words, an empty reply) scores 0. The
checker is the ground truth every reported accuracy and every judge-agreement figure is measured against.
"""
from __future__ import annotations

import re
from functools import lru_cache

from selfreward.recipes.world.tasks import KINDS, TEMPLATES, Task

_FIELD = {"a": r"(\d{1,2})", "b": r"(\d{1,2})", "ns": r"((?:\d{1,2}, ){2,9}\d{1,2})",
          "nsp": r"((?:\d{1,2} ){2,9}\d{1,2})", "x": r"([a-h])",
          "xs": r"((?:[0-9a-h] ){2,9}[0-9a-h])"}


@lru_cache(maxsize=None)
def _patterns() -> list[tuple[str, re.Pattern, list[str]]]:
    pats = []
    for kind in KINDS:
        for t in TEMPLATES[kind]:
            names = re.findall(r"\{(\w+)\}", t)
            rx = re.escape(t)
            for n in names:
                rx = rx.replace(re.escape("{" + n + "}"), _FIELD[n], 1)
            pats.append((kind, re.compile("^" + rx + "$"), names))
    return pats


def parse_prompt(prompt: str) -> Task | None:
    """The task an instruction states, or None when it is not one of the world's instructions."""
    p = " ".join(prompt.split())
    for kind, rx, names in _patterns():
        m = rx.match(p)
        if not m:
            continue
        vals = dict(zip(names, m.groups()))
        if kind == "add":
            args = (int(vals["a"]), int(vals["b"]))
        elif kind in ("max", "min"):
            args = tuple(int(v) for v in re.findall(r"\d+", vals.get("ns") or vals["nsp"]))
        elif kind == "sort":
            items = vals["xs"].split(" ")
            if not all(i.isdigit() for i in items):
                continue
            args = tuple(int(i) for i in items)
        elif kind == "reverse":
            args = tuple(vals["xs"].split(" "))
        else:
            args = (vals["x"], tuple(vals["xs"].split(" ")))
        return Task(kind, args, prompt)
    return None


def symbols(text: str) -> list[str]:
    """The answer positions of a response: its non-space characters."""
    return [c for c in text if not c.isspace()]


def is_correct(task: Task, response: str) -> bool:
    return symbols(response) == symbols(task.answer)


def check(prompt: str, response: str) -> float | None:
    """1.0 correct, 0.0 wrong, None when the prompt is not a world task (nothing to check against)."""
    task = parse_prompt(prompt)
    if task is None:
        return None
    return 1.0 if is_correct(task, response) else 0.0


def reward(path=None, template=None, device=None, dtype=None):
    """`--reward checker` (train/rl.py's REWARDS): a reward function (prompts, responses) -> 1.0 right, 0.0
    wrong; a prompt that is no world task is an error. Takes no model: the factory's arguments are unused."""
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = [check(p, r) for p, r in zip(prompts, responses)]
        bad = next((i for i, v in enumerate(out) if v is None), None)
        if bad is not None:
            raise ValueError(f"prompt {bad} is not one of the world's tasks: {prompts[bad][:60]!r}")
        return out
    return score
