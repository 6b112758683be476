"""The world's text and seed sets, as the JSONL records the trainers read.

- "web" text for M0: `{"text"}` documents in the plain chat layout (`User: ...` / `Assistant: ...`), the
  answers right only `p_right` of the time, and a share of grading documents whose comparisons are made
  against such imperfect answers: an M0 that knows the formats but is often wrong.
- the IFT seed: `{"prompt", "response"}` with correct answers (train split only).
- the EFT seed: `{"prompt", "response"}` where the prompt is the judge template around a candidate answer
  (half right, half one-edit wrong) and the response is the reference judgment, whose score agrees with the
  checker by construction (the paper keeps only EFT judgments that agree with human ranks).
- loop prompts: `{"id", "prompt"}` train-split instructions disjoint from the IFT seed's.
Every generator is seeded; no record holds a held-out instance.
"""
from __future__ import annotations

import random

from selfreward.recipes.world.judging import judge_prompt, judgment, noisy_judgment
from selfreward.recipes.world.tasks import DEFAULT_KINDS, Task, corrupt, draw_args, sample_tasks, solve

USER, ASSISTANT = "User: {}\n\n", "Assistant: {}"   # the plain template of model/tokenizer.py, as text


def chat_text(prompt: str, reply: str) -> str:
    return USER.format(prompt) + ASSISTANT.format(reply)


def noisy_answer(task: Task, rng: random.Random, p_right: float) -> str:
    return task.answer if rng.random() < p_right else corrupt(task.answer, rng)


def near_miss(task: Task, rng: random.Random) -> str:
    """A wrong answer of the kind a model makes: for max and min another number of the input (the largest
    or smallest numbers are the likeliest confusions), else one edit away."""
    if task.kind in ("max", "min"):
        others = sorted({a for a in task.args if str(a) != task.answer}, reverse=task.kind == "max")
        if others:
            return str(others[min(int(rng.expovariate(0.7)), len(others) - 1)])
    return corrupt(task.answer, rng)


def close_miss(task: Task, rng: random.Random) -> str:
    """The wrong answer this world's models make most: for max and min a number of the answer's digit count
    1-3 away from it (min 8 -> "9", 5 -> "3"), mostly not in the input; else one edit away."""
    if task.kind in ("max", "min"):
        a = int(task.answer)
        lo, hi = (0, 9) if a < 10 else (10, 99)
        near = [a + d for d in (-3, -2, -1, 1, 2, 3) if lo <= a + d <= hi]
        return str(rng.choice(near))
    return corrupt(task.answer, rng)


def candidate_for_judging(task: Task, rng: random.Random, near_misses: bool = True) -> str:
    """Half right; the rest one edit away or (`near_misses`) a near miss: the hardest contrasts, where only
    the checks tell."""
    if not near_misses:
        return task.answer if rng.random() < 0.5 else corrupt(task.answer, rng)
    u = rng.random()
    return task.answer if u < 0.5 else corrupt(task.answer, rng) if u < 0.75 else near_miss(task, rng)


def eft_candidate(task: Task, rng: random.Random, near_misses: bool = True, sizes: dict | None = None,
                  close: float = 0.0) -> str:
    """EFT candidates: 40% right, 15% one edit away, 25% a near miss, 20% the answer to another instance of the
    same kind (without `near_misses`: 40% right, 30% one edit, 30% another instance's answer). With
    only one-edit errors, copying the candidate's symbol as the 'expected' one is right at most positions,
    and a small judge learns that shortcut instead of computing the answer (seen in runs: the M1 judge
    copied the candidate's symbol half the time). `close` > 0: that share of the wrong candidates (60%) is a
    `close_miss` instead (0: none, and the very draws of before)."""
    u = rng.random()
    if u < 0.4:
        return task.answer
    if close and rng.random() < close:
        return close_miss(task, rng)
    if not near_misses and u < 0.7:
        return corrupt(task.answer, rng)
    if near_misses and u < 0.55:
        return corrupt(task.answer, rng)
    if near_misses and u < 0.8:
        return near_miss(task, rng)
    while True:
        other = solve(task.kind, draw_args(task.kind, rng, sizes))
        if other != task.answer:
            return other


def web_docs(n: int, seed: int, p_right: float = 0.75, p_judge: float = 0.3, kinds=DEFAULT_KINDS,
             fmt: str = "check", sizes: dict | None = None, near_misses: bool = True) -> list[dict]:
    """`sizes` (tasks.SIZES by default) and `near_misses` (False: the graded candidates are right or one edit
    away, as in the short-list world) let build.py write the first phase of M0's curriculum."""
    rng = random.Random(f"web:{seed}")
    tasks = sample_tasks(n, seed=10_000 + seed, unique=False, kinds=kinds, sizes=sizes)
    out = []
    for t in tasks:
        if rng.random() < p_judge:
            cand = candidate_for_judging(t, rng, near_misses)
            # the "web" grader is right only p_right of the time (see judging.noisy_judgment)
            text = noisy_judgment(t, cand, rng, p_right, fmt)
            out.append({"text": chat_text(judge_prompt(t.prompt, cand), text)})
        else:
            out.append({"text": chat_text(t.prompt, noisy_answer(t, rng, p_right))})
    return out


def ift_seed(n: int, seed: int, kinds=DEFAULT_KINDS) -> list[dict]:
    return [{"prompt": t.prompt, "response": t.answer, "kind": t.kind}
            for t in sample_tasks(n, seed=20_000 + seed, kinds=kinds)]


def eft_seed(n: int, seed: int, kinds=DEFAULT_KINDS, fmt: str = "check", sizes: dict | None = None,
             near_misses: bool = True, close: float = 0.0) -> list[dict]:
    rng = random.Random(f"eft:{seed}")
    out = []
    for t in sample_tasks(n, seed=30_000 + seed, kinds=kinds, sizes=sizes):
        cand = eft_candidate(t, rng, near_misses, sizes, close)
        out.append({"prompt": judge_prompt(t.prompt, cand), "response": judgment(t, cand, fmt=fmt), "kind": t.kind,
                    "correct": cand == t.answer})
    return out


def loop_prompts(n: int, seed: int, avoid: set[str] = frozenset(), kinds=DEFAULT_KINDS) -> list[dict]:
    """Instructions for the self-rewarding iterations (train split, none of them an IFT seed prompt)."""
    out = []
    for i, t in enumerate(sample_tasks(n + len(avoid), seed=40_000 + seed, kinds=kinds)):
        if t.prompt in avoid:
            continue
        out.append({"id": f"w{seed}-{i}", "prompt": t.prompt, "kind": t.kind})
        if len(out) == n:
            break
    return out
