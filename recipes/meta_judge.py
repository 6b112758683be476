"""Meta-judging (Meta-Rewarding, Wu et al. 2024): the model judges its own judgments. For each judged response
whose K judgments hold at least two distinct texts, every pair of distinct judgments is shown to M_t as a
meta-judge in both orders (A/B then B/A, so a preference for a position cancels); a judgment's win rate over
its comparisons ranks it, and the best against the worst of one response, when their rates differ, is a
judge preference pair (prompt: the judge prompt; chosen / rejected: the two judgments). Those pairs join the
actor's pairs in the iteration's DPO (recipes/README.md, "Meta-judging").
"""

import re
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from selfreward.recipes.judge import judge_prompt, prompt_budget
from selfreward.recipes.prompts import fit_prompt, load_template

DEFAULT_TEMPLATE = """\
You are checking two evaluations of the same reply. Each evaluation was asked to rate the reply to the \
request below and to end with a score.

Request:
{instruction}

Reply:
{response}

Evaluation A:
{judgment_a}

Evaluation B:
{judgment_b}

Which evaluation is more accurate? Prefer the one whose statements about the reply are true, whose reasoning \
follows from the request and the reply, and whose score is the one its own reasoning supports; ignore length \
and style. Give your reasons briefly, then end with a line "Better: A" or "Better: B"."""

BUILTIN = {"default": DEFAULT_TEMPLATE}
SLOTS = ("instruction", "response", "judgment_a", "judgment_b")


def load_meta_template(path: str | None) -> str:
    return load_template(path, DEFAULT_TEMPLATE, SLOTS, "meta-judge template", BUILTIN)


def parse_verdict(text: str, label: str = "Better", choices: tuple[str, str] = ("A", "B")) -> str | None:
    """'A' (the first judgment shown) or 'B' (the second) from the last `<label>: <choice>` of a meta-judgment
    (choices[0] names the first; "Evaluation A", "**B**", "(A)" are read too); None when there is none."""
    alt = "|".join(re.escape(c) for c in choices)
    found = list(re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(label)}\s*[:\uff1a]\s*(?:\*\*|\*|__)?\s*\(?\s*"
                             rf"(?:(?:evaluation|judgment|judgement)\s*)?\(?({alt})\)?(?![A-Za-z0-9_])", text, re.IGNORECASE))
    if not found:
        return None
    got = found[-1].group(1).lower()
    return "A" if got == choices[0].lower() else "B"


@dataclass
class MetaJudgeConfig:
    template: str = "default"      # meta-judge template file, or a built-in name (slots in SLOTS)
    temperature: float = 0.0       # one meta-judgment per order; 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    label: str = "Better"          # the verdict line: "<label>: <first choice | second choice>"
    choices: str = "A,B"           # how the template names the first and the second judgment shown

    def __post_init__(self):
        self.text = load_meta_template(self.template)
        a, b = self.names()
        if not (a and b and a.lower() != b.lower() and self.label.strip()):
            from selfreward.cli import ConfigError
            raise ConfigError(f"--meta-choices {self.choices!r} / --meta-label {self.label!r}: two different names, "
                              f"comma-separated, and a label")

    def names(self) -> tuple[str, str]:
        a, _, b = self.choices.partition(",")
        return a.strip(), b.strip()


def check_meta_fits(engine, tok, cfg: MetaJudgeConfig) -> None:
    """Before any work: the meta template with empty slots leaves room for a request, a reply and two judgments."""
    from selfreward.recipes.prompts import TemplateError, fill
    budget = prompt_budget(engine, cfg.max_tokens)
    empty = len(tok.user_ids(fill(cfg.text, **{k: "" for k in SLOTS})))
    if empty + 16 > budget:
        raise TemplateError(f"--meta-template {cfg.template}: the template alone takes {empty} tokens, but the "
                            f"model's context of {engine.max_len} less {cfg.max_tokens} meta-judgment tokens leaves "
                            f"{budget}: use a shorter template or fewer --meta-max-tokens")


def meta_units(judgments: Sequence[dict]) -> list[dict]:
    """The comparisons to make: per judged response (id, sample), each unordered pair of its distinct
    judgment texts (parsable ones whose prompt was not cut; the lowest k of equal texts stands for them),
    in both orders. A unit: {"id", "sample", "a": k, "b": k'}."""
    by: dict[tuple, dict[str, int]] = {}
    for j in sorted(judgments, key=lambda j: j["k"]):
        if j["score"] is None or j.get("prompt_cut"):
            continue
        by.setdefault((j["id"], j["sample"]), {}).setdefault(j["judgment"], j["k"])
    units = []
    for (pid, sample), texts in by.items():
        for a, b in combinations(sorted(texts.values()), 2):
            units += [{"id": pid, "sample": sample, "a": a, "b": b}, {"id": pid, "sample": sample, "a": b, "b": a}]
    return units


def meta_judge_items(engine, tok, items: Sequence[tuple[str, str, str, str]], cfg: MetaJudgeConfig,
                     seeds: Sequence[int]) -> list[tuple[str, str | None, bool]]:
    """(instruction, response, judgment A, judgment B) -> (meta-judgment, verdict, prompt was cut)."""
    from selfreward.infer.sequence import SamplingParams
    budget = prompt_budget(engine, cfg.max_tokens)
    fitted = [fit_prompt(tok, cfg.text, dict(zip(SLOTS, it)), budget) for it in items]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=s)
              for s in seeds]
    outs = engine.generate([f[0] for f in fitted], params)
    return [(g[0].text, parse_verdict(g[0].text, cfg.label, cfg.names()), f[1]) for g, f in zip(outs, fitted)]


def judge_pairs(prompts: dict[str, str], texts: dict[tuple, str], judgments: Sequence[dict], metas: Sequence[dict],
                judge_template: str) -> tuple[list[dict], dict]:
    """Judge preference pairs from the meta-judgments (`metas`: units of meta_units with "verdict"). Per
    response: each distinct judgment's wins / comparisons (a verdict for a position counts one win; an
    unparsable verdict counts for neither); the highest-rated against the lowest-rated when their rates
    differ (first of equals: the lowest k). prompts: id -> instruction; texts: (id, sample) -> response.
    Returns (pairs, counts): responses compared, pairs, ties (no gap), verdicts, unparsable, A-verdicts (the
    share of parsed verdicts naming the first position is the position bias; 0.5 is none) and order-flips
    (a pair of judgments whose two orders gave opposite positions, i.e. the same position both times)."""
    judgment = {(j["id"], j["sample"], j["k"]): j["judgment"] for j in judgments}
    by: dict[tuple, list[dict]] = {}
    for m in metas:
        by.setdefault((m["id"], m["sample"]), []).append(m)
    pairs, c = [], {"responses_compared": 0, "judge_pairs": 0, "meta_ties": 0, "meta_verdicts": len(metas),
                    "meta_parse_failures": 0, "meta_first_position": 0, "meta_position_only": 0}
    for (pid, sample), ms in sorted(by.items()):
        c["responses_compared"] += 1
        wins: dict[int, int] = {}
        games: dict[int, int] = {}
        said: dict[tuple, list[int]] = {}
        for m in ms:
            for k in (m["a"], m["b"]):
                games[k] = games.get(k, 0) + 1
                wins.setdefault(k, 0)
            v = m.get("verdict")
            if v is None:
                c["meta_parse_failures"] += 1
                continue
            c["meta_first_position"] += v == "A"
            won = m["a"] if v == "A" else m["b"]
            wins[won] += 1
            said.setdefault(tuple(sorted((m["a"], m["b"]))), []).append(won)
        c["meta_position_only"] += sum(len(w) == 2 and w[0] != w[1] for w in said.values())
        rate = {k: wins[k] / games[k] for k in sorted(games)}
        hi = max(rate, key=lambda k: (rate[k], -k))
        lo = min(rate, key=lambda k: (rate[k], k))
        if rate[hi] == rate[lo]:
            c["meta_ties"] += 1
            continue
        pairs.append({"id": pid, "sample": sample, "prompt": judge_prompt(judge_template, prompts[pid], texts[(pid, sample)]),
                      "chosen": judgment[(pid, sample, hi)], "rejected": judgment[(pid, sample, lo)],
                      "chosen_k": hi, "rejected_k": lo, "chosen_rate": rate[hi], "rejected_rate": rate[lo],
                      "judge_pair": True})
    c["judge_pairs"] = len(pairs)
    parsed = c["meta_verdicts"] - c["meta_parse_failures"]
    c["meta_position_bias"] = round(c["meta_first_position"] / parsed, 4) if parsed else None
    return pairs, c
