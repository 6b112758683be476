"""Head-to-head (`recipes.evaluate h2h`, recipes.select): the replies of checkpoints A and B to the same prompts,
judged by a third in both orders with a pairwise template (ours, or `--pair-template FILE`) that ends with
`Better: 1` or `Better: 2` (the last such label counts); a win only when both orders prefer A (recipes.metrics).
"""

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from selfreward import cli
from selfreward.records import field, iter_jsonl
from selfreward.recipes.judge import prompt_budget
from selfreward.recipes.metrics import h2h_outcome
from selfreward.recipes.prompts import fit_prompt, load_template

PAIR_TEMPLATE = """\
A user sent the request below to an AI assistant, and two replies came back. Decide which reply serves the \
user better: more relevant, more correct, more complete, clearer, with nothing that does not belong. \
Ignore which reply comes first and how long each one is.

Request:
{instruction}

Reply 1:
{response_1}

Reply 2:
{response_2}

Give your reasons in at most 100 words, then end with a line "Better: 1" or "Better: 2"."""

_BETTER = re.compile(r"(?<![A-Za-z0-9_])better\s*:\s*(?:\*\*|\*)?\s*(?:reply\s*)?([12])(?![0-9])", re.IGNORECASE)


@dataclass
class H2HConfig:
    """The judge, the prompts and the settings of a head-to-head (`evaluate h2h`, recipes.select)."""
    judge: str = cli.checkpoint("")                   # the judging checkpoint
    prompts: str = cli.input_file("")                 # held-out JSONL with a 'prompt' field
    limit: int = 0                    # only the first N prompts (0 = all)
    pair_template: str = cli.input_file("")           # pairwise judge template file; "" = recipes.h2h's own
    temperature: float = 0.0          # the replies: greedy by default
    top_p: float = 1.0
    judge_temperature: float = 0.0
    max_tokens: int = 256             # reply tokens, and the judge's
    seed: int = 0

    def __post_init__(self):          # the template itself (not a field: the config keeps the path)
        self.text = load_template(self.pair_template or None, PAIR_TEMPLATE,
                                  ("instruction", "response_1", "response_2"), "pair template")


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The 'prompt' field of every record of a JSONL file (errors name file:line); the first `limit` (0: all)."""
    return [field(r, "prompt", f"{path}:{i}") for i, r in iter_jsonl(path)][:limit or None]


def parse_choice(text: str) -> int | None:
    return int(found[-1]) if (found := _BETTER.findall(text)) else None


def generate_responses(engine, tok, prompts: list[str], cfg: H2HConfig, progress: bool = False,
                       index: list[int] | None = None) -> list[str]:
    """One reply per prompt; prompt i (its place in the whole job, `index`, default 0..n-1) from seed + i."""
    from selfreward.infer.sequence import SamplingParams
    ps = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed + i)
          for i in (range(len(prompts)) if index is None else index)]
    return [g[0].text for g in engine.generate([tok.user_ids(p) for p in prompts], ps, n=1,
                                               progress=progress)]


def pair_verdicts(judge_engine, judge_tok, prompts: list[str], resp_a: list[str], resp_b: list[str],
                  index: list[int], cfg: H2HConfig, progress: bool = False) -> list[dict]:
    """The judge's verdicts on prompts `index` (prompts / resp_* are the whole job's, n of them): per prompt
    {"i", "a_first", "b_first", "prompts_cut" (0-2)}, A shown first judged from seed + i, B first from
    seed + n + i, so a job judged in parts judges what one call would."""
    from selfreward.infer.sequence import SamplingParams
    budget, n = prompt_budget(judge_engine, cfg.max_tokens), len(prompts)
    jobs = [(i, first) for first in (True, False) for i in index]
    shown = [(resp_a[i], resp_b[i]) if first else (resp_b[i], resp_a[i]) for i, first in jobs]
    fitted = [fit_prompt(judge_tok, cfg.text, {"instruction": prompts[i], "response_1": r1, "response_2": r2},
                         budget) for (i, _), (r1, r2) in zip(jobs, shown)]
    ps = [SamplingParams(temperature=cfg.judge_temperature, max_tokens=cfg.max_tokens,
                         seed=cfg.seed + (i if first else n + i)) for i, first in jobs]
    outs = judge_engine.generate([f[0] for f in fitted], ps, n=1, progress=progress)
    k = len(index)
    return [{"i": i, "a_first": parse_choice(outs[j][0].text), "b_first": parse_choice(outs[k + j][0].text),
             "prompts_cut": int(fitted[j][1]) + int(fitted[k + j][1])} for j, i in enumerate(index)]


def h2h_result(prompts: list[str], resp_a: list[str], resp_b: list[str], verdicts: list[dict]) -> dict:
    """win / tie / loss (a win only when both orders prefer A) and the records, from pair_verdicts' output."""
    n = len(prompts)
    records = [{"prompt": prompts[v["i"]], "a": resp_a[v["i"]], "b": resp_b[v["i"]], "a_first": v["a_first"],
                "b_first": v["b_first"], "outcome": h2h_outcome(v["a_first"], v["b_first"])} for v in verdicts]
    c = Counter(r["outcome"] for r in records)
    return {**{k: c[k] / n if n else None for k in ("win", "tie", "loss")}, "n": n,
            "no_verdict": sum((v["a_first"] is None) + (v["b_first"] is None) for v in verdicts),
            "prompts_cut": sum(v["prompts_cut"] for v in verdicts), "records": records}


def head_to_head(judge_engine, judge_tok, prompts: list[str], resp_a: list[str], resp_b: list[str],
                 cfg: H2HConfig = H2HConfig(), progress: bool = False) -> dict:
    """Judge each prompt's (A, B) pair in both orders, in one call."""
    return h2h_result(prompts, resp_a, resp_b, pair_verdicts(judge_engine, judge_tok, prompts, resp_a, resp_b,
                                                             list(range(len(prompts))), cfg, progress))
