"""Evaluation commands: reward-model metrics of a judge checkpoint against human ranks, and head-to-head
win / tie / loss of two checkpoints judged by a third in both orders. Each prints a table and writes JSON.

    python -m selfreward.recipes.evaluate rm  --judge DIR --groups groups_eval.jsonl --out rm.json [--k 3] [--expected]
    python -m selfreward.recipes.evaluate h2h --a DIR --b DIR --judge DIR --prompts p.jsonl --out h2h.json
    python -m selfreward.recipes.evaluate reward --kind rm --model RM_DIR --groups groups_eval.jsonl --out r.json

Metric definitions: recipes/metrics.py. The head-to-head judge sees a pairwise template (ours; placeholders
{instruction}, {response_1}, {response_2}; `--pair-template FILE` to bring your own) and ends with
`Better: 1` or `Better: 2` (the last such label counts; anything else is no verdict, counted as a tie).
"""
from __future__ import annotations

import argparse
import hashlib
import re
from collections import Counter
from pathlib import Path

from selfreward.cli import check_args
from selfreward.records import DataError, field, iter_jsonl, nonempty, write_json
from selfreward.recipes.judge import JudgeConfig, chat_prompt_ids, check_fits, fit_slots, judge_items, mean_score, \
    prompt_budget
from selfreward.recipes.metrics import h2h_outcome, rm_metrics

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
_PAIR_SLOT = re.compile(r"\{(instruction|response_1|response_2)\}")


def parse_choice(text: str) -> int | None:
    last = None
    for m in _BETTER.finditer(text):
        last = m
    return int(last.group(1)) if last else None


def pair_prompt(template: str, instruction: str, r1: str, r2: str) -> str:
    vals = {"instruction": instruction, "response_1": r1, "response_2": r2}
    return _PAIR_SLOT.sub(lambda m: vals[m.group(1)], template)


def _load(path: str, engine_cfg=None):
    from selfreward.infer.config import load_engine
    engine = load_engine(path, engine_cfg)
    return engine, engine.tokenizer


def load_groups(path: str | Path) -> list[dict]:
    out = []
    for i, rec in iter_jsonl(path):
        where = f"{path}:{i}"
        field(rec, "prompt", where)
        reps = field(rec, "replies", where, list)
        for r in reps:
            if not isinstance(r, dict) or "text" not in r or "rank" not in r:
                raise DataError(f"{where}: field 'replies' needs objects with 'text' and 'rank'")
        out.append(rec)
    return out


def rm_eval(engine, tok, groups: list[dict], cfg: JudgeConfig, progress: bool = False,
            store: str | Path | None = None, chunk: int = 64) -> dict:
    """Judge every reply of every group (K samples, mean score; optionally the expected score too) and
    compute the metrics. Returns {"sampled": metrics, "expected": metrics | None, "records": per reply}.
    `store`: a JSONL file the judgments are kept in, `chunk` replies at a time, each reply's as soon as its
    chunk is done (selfreward.units.run_units), so a killed run's rerun judges only the replies not yet
    there; reply j is judged from seed + j * K either way."""
    items = [(g["prompt"], r["text"]) for g in groups for r in g["replies"]]
    seeds = [cfg.seed + j * cfg.k for j in range(len(items))]
    res = judge_items(engine, tok, items, cfg, seeds, progress) if store is None else \
        _stored_judgments(engine, tok, items, cfg, seeds, Path(store), chunk, progress)
    judged = [r.samples for r in res]
    exp = [(r.expected,) for r in res] if cfg.expected else None
    records, sampled_groups, expected_groups, pos = [], [], [], 0
    for g in groups:
        ranks, ms, es = [], [], []
        for r in g["replies"]:
            js = judged[pos]
            m = mean_score([s for _, s in js])
            ranks.append(r["rank"])
            ms.append(m)
            rec = {"group": g.get("id"), "rank": r["rank"], "scores": [s for _, s in js], "mean": m,
                   "judgment": js[0][0]}
            if exp is not None:
                rec["expected"] = exp[pos][0]
                es.append(exp[pos][0])
            records.append(rec)
            pos += 1
        sampled_groups.append((ranks, ms))
        expected_groups.append((ranks, es))
    out = {"sampled": rm_metrics(sampled_groups), "expected": rm_metrics(expected_groups) if exp else None,
           "judgments": sum(len(j) for j in judged), "prompts_cut": sum(r.prompt_cut for r in res), "parse_failures": sum(s is None for j in judged for _, s in j),
           "records": records}
    return out


def _stored_judgments(engine, tok, items, cfg: JudgeConfig, seeds: list[int], store: Path, chunk: int,
                      progress: bool) -> list:
    from selfreward.recipes.judge import Judged
    from selfreward.records import read_jsonl
    from selfreward.units import run_units

    def work(batch, emit) -> None:
        js, gen = [j for j, _ in batch], engine.stats["generated"]
        got = judge_items(engine, tok, [items[j] for j in js], cfg, [seeds[j] for j in js])
        per = (engine.stats["generated"] - gen) // max(1, len(js))
        for j, r in zip(js, got):
            emit(j, [{"j": j, "samples": [list(x) for x in r.samples], "prompt_cut": r.prompt_cut,
                      "expected": r.expected}], per)
    run_units(store, [{"j": j} for j in range(len(items))], 1, lambda r: r["j"], work, chunk=chunk,
              progress="evaluate rm" if progress else "", unit="replies")
    return [Judged([tuple(x) for x in r["samples"]], r["prompt_cut"], r["expected"]) for r in read_jsonl(store)]


def reward_eval(reward, groups: list[dict], perfect: float | None = None) -> dict:
    """Table 4 metrics of any recipes.reward source: each reply's reward as its score. `perfect`: the best
    grade, for the 5-best metric (None for an unbounded RM score)."""
    items = [(g["prompt"], r["text"]) for g in groups for r in g["replies"]]
    scores = reward([i for i, _ in items], [r for _, r in items])
    it = iter(scores)
    ranked = [([r["rank"] for r in g["replies"]], [next(it) for _ in g["replies"]]) for g in groups]
    return {"metrics": rm_metrics(ranked, perfect), "records": [{"group": g.get("id"), "rank": r["rank"], "reward": x}
            for g, (_, xs) in zip(groups, ranked) for r, x in zip(g["replies"], xs)]}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_rm(res: dict, title: str = "") -> None:
    names = [("pairwise_accuracy", "pairwise accuracy"), ("five_best", "5-best"), ("exact_match", "exact match"),
             ("spearman", "Spearman"), ("kendall_tau", "Kendall tau")]
    cols = ["sampled"] + (["expected"] if res.get("expected") else [])
    print(title)
    print(f"| metric | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for key, name in names:
        print(f"| {name} | {' | '.join(_fmt(res[c][key]) for c in cols)} |")
    for key in ("groups_used", "pairs", "pairs_judge_tied"):
        print(f"| {key.replace('_', ' ')} | {' | '.join(str(res[c][key]) for c in cols)} |")
    s = res["sampled"]
    print(f"groups {s['groups']} (used {s['groups_used']}), pairs {s['pairs']} (judge-tied {s['pairs_judge_tied']}),"
          f" judgments {res['judgments']}, unparsable {res['parse_failures']}, perfect 5s {s['perfect_scores']},"
          f" judge prompts cut to fit the context {res['prompts_cut']}; Spearman/Kendall over {s['corr_groups']} groups"
          f" ({s['corr_skipped_human_tied']} skipped: human ranks all equal)")


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
    render = lambda v: pair_prompt(template, v["i"], v["r1"], v["r2"])  # noqa: E731
    jobs = [(i, first) for first in (True, False) for i in index]
    fitted = [fit_slots(judge_tok, render, {"i": prompts[i], "r1": resp_a[i] if first else resp_b[i],
                                            "r2": resp_b[i] if first else resp_a[i]}, budget) for i, first in jobs]
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
    return {"win": c["win"] / n if n else None, "tie": c["tie"] / n if n else None,
            "loss": c["loss"] / n if n else None, "n": n,
            "no_verdict": sum((v["a_first"] is None) + (v["b_first"] is None) for v in verdicts),
            "prompts_cut": sum(v["prompts_cut"] for v in verdicts), "records": records}


def head_to_head(judge_engine, judge_tok, prompts: list[str], resp_a: list[str], resp_b: list[str],
                 template: str = PAIR_TEMPLATE, temperature: float = 0.0, max_tokens: int = 256,
                 seed: int = 0, progress: bool = False) -> dict:
    """Judge each prompt's (A, B) pair in both orders; win only when both orders prefer A."""
    n = len(prompts)
    return h2h_result(prompts, resp_a, resp_b, pair_verdicts(judge_engine, judge_tok, prompts, resp_a, resp_b,
                                                             list(range(n)), n, template, temperature, max_tokens,
                                                             seed, progress))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="reward-model metrics and head-to-head evaluation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rm = sub.add_parser("rm", help="judge held-out human-ranked groups; Table 4 metrics")
    rm.add_argument("--judge", required=True)
    rm.add_argument("--groups", required=True, help="groups JSONL from recipes.oasst (groups_eval.jsonl)")
    rm.add_argument("--judge-template")
    rm.add_argument("--k", type=int, default=3)
    rm.add_argument("--temperature", type=float, default=0.7)
    rm.add_argument("--top-p", type=float, default=0.9)
    rm.add_argument("--max-tokens", type=int, default=256)
    rm.add_argument("--expected", action="store_true", help="also the expected score from the digit distribution")
    rm.add_argument("--limit", type=int, help="only the first N groups")
    hh = sub.add_parser("h2h", help="win / tie / loss of --a against --b, judged in both orders")
    hh.add_argument("--a", required=True)
    hh.add_argument("--b", required=True)
    hh.add_argument("--judge", required=True)
    hh.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    hh.add_argument("--pair-template")
    hh.add_argument("--temperature", type=float, default=0.0, help="response sampling (0 = greedy)")
    hh.add_argument("--top-p", type=float, default=1.0)
    hh.add_argument("--judge-temperature", type=float, default=0.0)
    hh.add_argument("--max-tokens", type=int, default=256)
    hh.add_argument("--limit", type=int)
    hh.add_argument("--chunk", type=int, default=128, help="prompts per engine call; each prompt's replies and "
                    "verdicts reach OUT.h2h/*.jsonl.partial once its chunk is done (a killed run resumes)")
    rw = sub.add_parser("reward", help="Table 4 metrics of a reward source (recipes.reward: rm, direct, judge)")
    rw.add_argument("--kind", choices=("rm", "direct", "judge"), default="rm")
    rw.add_argument("--model", required=True, help="the reward model, labeller or judge checkpoint")
    rw.add_argument("--groups", required=True)
    rw.add_argument("--limit", type=int)
    from selfreward.infer.config import add_engine_flags, engine_from_flags, resolve_device
    rm.add_argument("--chunk", type=int, default=64, help="replies judged per engine call; each reply's "
                    "judgments reach OUT.judgments.jsonl.partial once its chunk is done (a killed run resumes)")
    for p in (rm, hh, rw):
        p.add_argument("--out", required=True, help="JSON file for the results")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true",
                       help="start over when OUT was made with another model, input or settings")
        engine_dests = add_engine_flags(p)
    a = check_args(ap.parse_args(argv))
    ecfg = engine_from_flags(a, engine_dests)
    device, dtype = resolve_device(ecfg)     # a bad engine flag stops here, before any work
    _check_flags(a)
    from selfreward.provenance import claim, file_hash, model_fingerprint
    from selfreward.records import partial_path
    out = Path(a.out)
    made = {"cmd": a.cmd, "seed": a.seed, "dtype": str(dtype).removeprefix("torch."), "limit": a.limit}
    if a.cmd == "reward":
        from selfreward.recipes.reward import load_reward
        made.update(kind=a.kind, model_fingerprint=model_fingerprint(a.model), groups_hash=file_hash(a.groups))
        with claim(out, made, [a.groups], a.overwrite, clear=lambda: out.unlink(missing_ok=True)):
            res = reward_eval(load_reward(a.kind, a.model, device=device, dtype=dtype),
                              load_groups(a.groups)[:a.limit], None if a.kind == "rm" else 1.0)
            res["settings"] = {"kind": a.kind, "model": a.model, "groups": a.groups, "limit": a.limit}
            m = res["metrics"]
            print(f"reward metrics ({a.kind} {a.model} on {a.groups}): " + ", ".join(
                f"{k} {_fmt(m[k])}" for k in ("pairwise_accuracy", "five_best", "exact_match", "spearman",
                                              "kendall_tau")) + f"; groups used {m['groups_used']}, pairs {m['pairs']}")
            _finish(res, out, device, dtype)
    elif a.cmd == "rm":
        groups = nonempty(load_groups(a.groups)[:a.limit], a.groups, "groups")
        cfg = JudgeConfig(k=a.k, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed,
                          template=a.judge_template or "default", expected=a.expected)
        made.update(judge_fingerprint=model_fingerprint(a.judge), groups_hash=file_hash(a.groups), k=a.k,
                    temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, expected=a.expected,
                    rubric=hashlib.sha256(cfg.text.encode()).hexdigest()[:16])
        store = judgments_path(out)      # the resumable judgments: the claimed output, its record beside it

        def clear() -> None:
            for f in (store, partial_path(store), out):
                f.unlink(missing_ok=True)
        inputs = [a.groups] + ([a.judge_template] if a.judge_template and Path(a.judge_template).is_file() else [])
        with claim(store, made, inputs, a.overwrite, clear=clear):
            engine, tok = _load(a.judge, ecfg)
            check_fits(engine, tok, cfg)
            res = rm_eval(engine, tok, groups, cfg, progress=True, store=store, chunk=a.chunk)
            res["settings"] = {"judge": a.judge, "groups": a.groups, "k": a.k, "temperature": a.temperature,
                               "top_p": a.top_p, "max_tokens": a.max_tokens, "seed": a.seed}
            print_rm(res, f"reward-model metrics: judge {a.judge} on {a.groups}")
            _finish(res, out, device, dtype)
    else:
        prompts = nonempty([field(r, "prompt", f"{a.prompts}:{i}") for i, r in iter_jsonl(a.prompts)][:a.limit],
                           a.prompts, "prompts")
        tmpl = PAIR_TEMPLATE if a.pair_template is None else Path(a.pair_template).read_text(encoding="utf-8")
        for slot in ("{instruction}", "{response_1}", "{response_2}"):
            if slot not in tmpl:
                raise DataError(f"{a.pair_template}: pair template lacks placeholder {slot}")
        made.update(a_fingerprint=model_fingerprint(a.a), b_fingerprint=model_fingerprint(a.b),
                    judge_fingerprint=model_fingerprint(a.judge), prompts_hash=file_hash(a.prompts),
                    template=hashlib.sha256(tmpl.encode()).hexdigest()[:16], temperature=a.temperature,
                    top_p=a.top_p, judge_temperature=a.judge_temperature, max_tokens=a.max_tokens)
        inputs = [a.prompts] + ([a.pair_template] if a.pair_template else [])
        work = h2h_work_dir(out)         # the resumable parts (A's and B's replies, the verdicts) and the record

        def clear() -> None:             # the folder's files, not its lock (held now)
            for f in list(work.iterdir()) if work.is_dir() else []:
                if f.name != ".lock":
                    f.unlink()
            out.unlink(missing_ok=True)
        with claim(work, made, inputs, a.overwrite, folder=True, clear=clear):
            res = _h2h_resumable(a, ecfg, prompts, tmpl, work)
            res["settings"] = {"a": a.a, "b": a.b, "judge": a.judge, "prompts": a.prompts}
            print(f"| A vs B | win | tie | loss | n |\n|---|---|---|---|---|\n| {a.a} vs {a.b} | {_fmt(res['win'])} | "
                  f"{_fmt(res['tie'])} | {_fmt(res['loss'])} | {res['n']} |  (no verdict: {res['no_verdict']})")
            _finish(res, out, device, dtype)
    return res


def h2h_work_dir(out: str | Path) -> Path:
    """Where `evaluate h2h --out OUT` keeps its resumable parts: OUT.h2h/{replies_a,replies_b,verdicts}.jsonl."""
    out = Path(out)
    return out.with_name(out.name + ".h2h")


def _h2h_resumable(a, ecfg, prompts: list[str], tmpl: str, work: Path) -> dict:
    """A's replies, B's replies, then the verdicts, each a resumable file of units (selfreward.units.run_units,
    a unit a prompt): a killed run's rerun does only what is missing; one model in memory at a time."""
    from selfreward.records import read_jsonl
    from selfreward.units import run_units
    n, units = len(prompts), [{"i": i} for i in range(len(prompts))]
    key = lambda r: r["i"]  # noqa: E731

    def stage(name: str, model: str, fn) -> list[dict]:
        held: dict = {}

        def work_fn(batch, emit) -> None:
            if "engine" not in held:       # loaded only when a unit is left
                held["engine"] = _load(model, ecfg)
            for r in fn(*held["engine"], [i for i, _ in batch]):
                emit(r["i"], [r])
        run_units(work / f"{name}.jsonl", units, 1, key, work_fn, chunk=a.chunk, progress=f"h2h {name}",
                  unit="prompts")
        return read_jsonl(work / f"{name}.jsonl")

    def replies(eng, tok, idx):
        texts = generate_responses(eng, tok, [prompts[i] for i in idx], a.temperature, a.top_p, a.max_tokens,
                                   a.seed, progress=True, index=idx)
        return [{"i": i, "text": t} for i, t in zip(idx, texts)]
    resp_a = [r["text"] for r in stage("replies_a", a.a, replies)]
    resp_b = [r["text"] for r in stage("replies_b", a.b, replies)]
    verdicts = stage("verdicts", a.judge, lambda eng, tok, idx: pair_verdicts(
        eng, tok, prompts, resp_a, resp_b, idx, n, tmpl, a.judge_temperature, a.max_tokens, a.seed, progress=True))
    return h2h_result(prompts, resp_a, resp_b, verdicts)


def judgments_path(out: str | Path) -> Path:
    """Where `evaluate rm --out OUT` keeps its judgments (resumable; OUT is computed from them)."""
    out = Path(out)
    return out.with_name(out.name + ".judgments.jsonl")


def _finish(res: dict, out: Path, device: str, dtype) -> None:
    res["settings"].update(device=device, dtype=str(dtype).removeprefix("torch."))
    write_json(out, res)


def _check_flags(a) -> None:
    """Each flag checked before any work, the error naming it."""
    from selfreward.cli import ConfigError
    for flag, lo in (("k", 1), ("limit", 1), ("max_tokens", 1), ("temperature", 0), ("judge_temperature", 0),
                     ("chunk", 1)):
        v = getattr(a, flag, None)
        if v is not None and v < lo:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}: must be >= {lo}")
    if getattr(a, "top_p", None) is not None and not 0 < a.top_p <= 1:
        raise ConfigError(f"--top-p {a.top_p}: must lie in (0, 1]")
    if a.cmd == "reward":
        nonempty(load_groups(a.groups), a.groups, "groups")
    from selfreward.provenance import check_not_input
    check_not_input([getattr(a, k) for k in ("groups", "prompts", "judge_template", "pair_template")
                     if getattr(a, k, None)], [a.out])


if __name__ == "__main__":
    from selfreward.cli import run_main
    run_main(main)
