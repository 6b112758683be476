"""The judge: an additive 5-point rubric (our wording; slots {instruction} and {response}, a final line
`Score: <n>`), score parsing, K-sample means and the expected score from the next-token distribution over the
digits "0".."5" (recipes/README.md, "The judge").
"""

import re
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Sequence

from selfreward.recipes.prompts import TemplateError, fill, fit_prompt, load_template, \
    option_probs

DEFAULT_TEMPLATE = """\
Please rate how well the reply below serves the user's request. Start from 0 and add one point for each \
statement that holds:
- The reply is on topic and tells the user something relevant, even if it is partial or contains \
some unrelated material.
- It deals with a large part of what was asked, though it may not settle the question or answer it directly.
- It answers the core of the request in a way the user can act on, even if it is not complete or not the \
most helpful it could be.
- It speaks clearly as an AI assistant, answers directly and fully, and is well organised; small gains in \
brevity, focus or clarity would still be possible.
- It is tailored exactly to the request: expert, engaging and insightful, with nothing that does not \
belong.

Request:
{instruction}

Reply:
{response}

Explain your rating in at most 100 words. End with a line of the form "Score: <points>", where <points> \
is a whole number from 0 to 5."""

# The same rubric in fewer words, for models with a short context (a 512-token model cannot hold the default).
SHORT_TEMPLATE = """\
Rate the reply from 0 to 5, one point for each: on topic; covers much of the request; answers its core \
usefully; clear, direct and complete; expert and tailored with nothing extra.
Request: {instruction}
Reply: {response}
Explain briefly, then end with "Score: <points>"."""

# A rubric on the request's explicit instructions (format, length, words to use or avoid, letter case, how to
# begin or end): the judge of the real demo's second self-rewarding row (recipes/real_demo.py).
INSTRUCTIONS_TEMPLATE = """\
The request below ends with instructions on the form of the reply (such as its length, format, letter case, \
words to use or avoid, or how it must begin or end). Check the reply against each instruction, one at a time.
Request:
{instruction}

Reply:
{response}

Name each instruction and say whether the reply follows it exactly. Then end with "Score: <points>": 5 when \
every instruction is followed exactly, 0 when none is, and in between the share that is followed."""

BUILTIN = {"default": DEFAULT_TEMPLATE, "short": SHORT_TEMPLATE, "instructions": INSTRUCTIONS_TEMPLATE}
SLOTS = ("instruction", "response")


def load_rubric(path: str | Path | None) -> str:
    """The default rubric (None), a built-in by name, or a rubric file (which wins over a built-in name)."""
    return load_template(path, DEFAULT_TEMPLATE, SLOTS, "judge template", BUILTIN)


def judge_prompt(template: str, instruction: str, response: str) -> str:
    return fill(template, instruction=instruction, response=response)


# "Score" as a word and a colon; then, at that point, optional markdown emphasis and a number: digits with
# an optional decimal part. ASCII digits only ([0-9], not \d, which would accept Arabic-Indic digits).
_LABEL = re.compile(r"(?<![A-Za-z0-9_])score\s*[:\uff1a]", re.IGNORECASE)
_NUMBER = re.compile(r"\s*(?:\*\*|\*|__)?\s*([0-9]+(?:\.[0-9]+)?)(?![0-9]|\.[0-9]|[eE][+-]?[0-9])")


def parse_score(text: str, lo: float = 0.0, hi: float = 5.0) -> float | None:
    """The number after the LAST `Score:` label in `text`, in [lo, hi]; else None ("Score: 3 ... Score: N/A"
    and "Score: 45" are None). The rules: recipes/README.md, "The judge"."""
    labels = list(_LABEL.finditer(text))
    num = _NUMBER.match(text, labels[-1].end()) if labels else None
    return float(num.group(1)) if num and lo <= float(num.group(1)) <= hi else None


def mean_score(scores: Sequence[float | None]) -> float | None:
    """Mean over the parsable samples; None when none parsed (the candidate is then excluded, not a loser)."""
    ok = [s for s in scores if s is not None]
    return mean(ok) if ok else None


def mean_scores(judgments: Sequence[dict], key: str = "score", unit=lambda j: (j["id"], j["sample"])) -> dict:
    """unit(judgment) -> the mean_score of its judgments' `key` ("score", or "expected": the expected score)."""
    by: dict = {}
    for j in judgments:
        by.setdefault(unit(j), []).append(j.get(key))
    return {k: mean_score(v) for k, v in by.items()}


@dataclass
class JudgeConfig:
    k: int = 3                     # judgments sampled per response, scores averaged
    temperature: float = 0.7       # the paper does not state it; 0.7 / top-p 0.9 as for candidates
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int = 0
    template: str = "default"      # rubric file, or a built-in name (default, short)
    expected: bool = False         # also the expected score from the digit distribution after "Score:"
    distinct: bool = False         # loop: judge each distinct candidate text of a prompt once (K times) and
                                   # skip prompts whose candidates are all one text (they cannot pair)
    score_prefix: str = "Score:"

    def __post_init__(self):   # the numbers are checked at the door (ranges.py)
        self.text = load_rubric(self.template)   # the rubric itself (not a field: the config keeps the name)


def check_fits(engine, tok, cfg: JudgeConfig) -> None:
    """Before any work: the rubric with empty slots leaves room for a request and a reply in the context."""
    budget = prompt_budget(engine, cfg.max_tokens)
    empty = len(tok.user_ids(judge_prompt(cfg.text, "", "")))
    if empty + 8 > budget:
        raise TemplateError(f"--judge-template {cfg.template}: the rubric alone takes {empty} tokens, but the model's "
                            f"context of {engine.max_len} less {cfg.max_tokens} judgment tokens leaves {budget}: "
                            f"use a shorter template or fewer judge max tokens")


def prompt_budget(engine, max_tokens: int) -> int:
    """Prompt tokens that leave room for `max_tokens` of judgment (at least a quarter of the context)."""
    max_len = getattr(engine, "max_len", 1 << 30)
    return max(max_len - max_tokens, max_len // 4) - 1


@dataclass
class Judged:
    samples: list[tuple[str, float | None]]   # K (judgment text, parsed score or None)
    prompt_cut: bool                          # the reply or request was cut to fit the context
    expected: float | None = None             # expected score (cfg.expected)


def judge_items(engine, tok, items: Sequence[tuple[str, str]], cfg: JudgeConfig, seeds: Sequence[int],
                progress: bool = False) -> list[Judged]:
    """The one judging path: fit each (instruction, response) judge prompt to the context, read the expected
    score when asked, sample K judgments (item j from seed seeds[j]) and parse them."""
    from selfreward.infer.sequence import SamplingParams
    budget = prompt_budget(engine, cfg.max_tokens)
    fitted = [fit_prompt(tok, cfg.text, {"instruction": ins, "response": resp}, budget) for ins, resp in items]
    ids = [f[0] for f in fitted]
    exp = expected_scores(engine, tok, ids, cfg.score_prefix) if cfg.expected else None
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=sd)
              for sd in seeds]
    outs = engine.generate(ids, params, n=cfg.k, progress=progress)
    return [Judged([(c.text, parse_score(c.text)) for c in g], fitted[j][1], exp[j][0] if exp else None)
            for j, g in enumerate(outs)]


def expected_scores(engine, tok, prompts: list[list[int]], prefix: str = "Score:", lo: int = 0, hi: int = 5
                    ) -> list[tuple[float, list[float]]]:
    """Per prompt (chat ids): (expected score, P(lo..hi)) with the answer forced to begin with `prefix`
    (recipes.prompts.option_probs). One scoring pass, no sampling."""
    probs = option_probs(engine, tok, prompts, prefix, [str(d) for d in range(lo, hi + 1)])
    return [(sum((lo + d) * q for d, q in enumerate(p)), p) for p in probs]
