"""Head-to-head: the replies of checkpoints A and B to the same prompts, judged by a third in both orders; a
win only when both orders prefer A (recipes.metrics.h2h_outcome). The judge sees a pairwise template (ours;
placeholders {instruction}, {response_1}, {response_2}; `--pair-template FILE` to bring your own) and ends
with `Better: 1` or `Better: 2` (the last such label counts; anything else is no verdict, counted as a tie).
Used by `recipes.evaluate h2h` and recipes.select.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from selfreward.records import field, iter_jsonl
from selfreward.recipes.judge import prompt_budget
from selfreward.recipes.metrics import h2h_outcome
from selfreward.recipes.prompts import chat_prompt_ids, fit_prompt, load_template

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


def load_pair_template(path: str | Path | None) -> str:
    """The built-in pairwise template (None or ""), or a file holding its three placeholders."""
    return load_template(path or None, PAIR_TEMPLATE, ("instruction", "response_1", "response_2"), "pair template")


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The 'prompt' field of every record of a JSONL file (errors name file:line); the first `limit` (0: all)."""
    return [field(r, "prompt", f"{path}:{i}") for i, r in iter_jsonl(path)][:limit or None]


def parse_choice(text: str) -> int | None:
    found = _BETTER.findall(text)
    return int(found[-1]) if found else None


def generate_responses(engine, tok, prompts: list[str], temperature: float, top_p: float, max_tokens: int,
                       seed: int, progress: bool = False, index: list[int] | None = None) -> list[str]:
    """One reply per prompt; prompt i (its place in the whole job, `index`, default 0..n-1) from seed + i."""
    from selfreward.infer.sequence import SamplingParams
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    ps = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed + i)
          for i in (range(len(ids)) if index is None else index)]
    return [g[0].text for g in engine.generate(ids, ps, n=1, progress=progress)]


def pair_verdicts(judge_engine, judge_tok, prompts: list[str], resp_a: list[str], resp_b: list[str],
                  index: list[int], n: int, template: str = PAIR_TEMPLATE, temperature: float = 0.0,
                  max_tokens: int = 256, seed: int = 0, progress: bool = False) -> list[dict]:
    """The judge's verdicts on prompts `index` (of n in the job; prompts / resp_* are the whole job's): per
    prompt {"i", "a_first", "b_first", "prompts_cut" (0-2)}, A shown first judged from seed + i, B first from
    seed + n + i, so a job judged in parts judges what one call would."""
    from selfreward.infer.sequence import SamplingParams
    budget = prompt_budget(judge_engine, max_tokens)
    jobs = [(i, first) for first in (True, False) for i in index]
    shown = [(resp_a[i], resp_b[i]) if first else (resp_b[i], resp_a[i]) for i, first in jobs]
    fitted = [fit_prompt(judge_tok, template, {"instruction": prompts[i], "response_1": r1, "response_2": r2},
                         budget) for (i, _), (r1, r2) in zip(jobs, shown)]
    ps = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + (i if first else n + i))
          for i, first in jobs]
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
                 template: str = PAIR_TEMPLATE, temperature: float = 0.0, max_tokens: int = 256,
                 seed: int = 0, progress: bool = False) -> dict:
    """Judge each prompt's (A, B) pair in both orders, in one call."""
    n = len(prompts)
    return h2h_result(prompts, resp_a, resp_b, pair_verdicts(judge_engine, judge_tok, prompts, resp_a, resp_b,
                                                             list(range(n)), n, template, temperature, max_tokens,
                                                             seed, progress))


def h2h_work_dir(out: str | Path) -> Path:
    """Where `evaluate h2h --out OUT` keeps its resumable parts: OUT.h2h/{replies_a,replies_b,verdicts}.jsonl."""
    out = Path(out)
    return out.with_name(out.name + ".h2h")


def resumable_h2h(a, ecfg, prompts: list[str], tmpl: str, work: Path) -> dict:
    """`evaluate h2h`: A's replies, B's replies, then the verdicts, each a resumable file in `work`, a unit a
    prompt (recipes.onestage.unit_records): a killed run's rerun does only what is missing; one model in
    memory at a time."""
    from selfreward.recipes.onestage import unit_records
    from selfreward.recipes.session import Session
    n, units, session = len(prompts), [{"i": i} for i in range(len(prompts))], Session(ecfg)

    def stage(name: str, model: str, fn) -> list[dict]:
        return unit_records(work / f"{name}.jsonl", units, lambda: session.get(model),
                            lambda eng, tok, batch: [(r, 0) for r in fn(eng, tok, [i for i, _ in batch])],
                            a.chunk, f"h2h {name}", "prompts")

    def replies(eng, tok, idx):
        texts = generate_responses(eng, tok, [prompts[i] for i in idx], a.temperature, a.top_p, a.max_tokens,
                                   a.seed, progress=True, index=idx)
        return [{"i": i, "text": t} for i, t in zip(idx, texts)]
    resp_a = [r["text"] for r in stage("replies_a", a.a, replies)]
    resp_b = [r["text"] for r in stage("replies_b", a.b, replies)]
    verdicts = stage("verdicts", a.judge, lambda eng, tok, idx: pair_verdicts(
        eng, tok, prompts, resp_a, resp_b, idx, n, tmpl, a.judge_temperature, a.max_tokens, a.seed, progress=True))
    return h2h_result(prompts, resp_a, resp_b, verdicts)
