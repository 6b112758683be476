"""Evaluation commands: reward-model metrics of a judge checkpoint (or any recipes.reward source) against
human ranks, and head-to-head win / tie / loss of two checkpoints judged by a third in both orders
(recipes/h2h.py). Each prints a table and writes JSON (recipes/README.md, "Metrics").

    python -m selfreward.recipes.evaluate rm  --judge DIR --groups groups_eval.jsonl --out rm.json [--k 3] [--expected]
    python -m selfreward.recipes.evaluate h2h --a DIR --b DIR --judge DIR --prompts p.jsonl --out h2h.json
    python -m selfreward.recipes.evaluate reward --kind rm --model RM_DIR --groups groups_eval.jsonl --out r.json
"""

import argparse
import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

from selfreward import cli
from selfreward.provenance import check_not_input, file_hash, made_by, model_fingerprint
from selfreward.records import DataError, field, iter_jsonl, nonempty, write_json
from selfreward.recipes.h2h import H2HConfig
from selfreward.recipes.judge import JudgeConfig, Judged, check_fits, judge_items, mean_score
from selfreward.recipes.metrics import rm_metrics
from selfreward.recipes.pipeline import claimed, parse, unit_records


def load_groups(path: str | Path) -> list[dict]:
    out = []
    for i, rec in iter_jsonl(path):
        where = f"{path}:{i}"
        field(rec, "prompt", where)
        if not all(isinstance(r, dict) and "text" in r and "rank" in r for r in field(rec, "replies", where, list)):
            raise DataError(f"{where}: field 'replies' needs objects with 'text' and 'rank'")
        out.append(rec)
    return out


def rm_eval(engine, tok, groups: list[dict], cfg: JudgeConfig, progress: bool = False) -> dict:
    """rm_result of every reply judged (K samples; the expected score if asked), reply j from seed + j * K."""
    items = reply_items(groups)
    return rm_result(groups, cfg, judge_items(engine, tok, items, cfg, [cfg.seed + j * cfg.k
                                                                        for j in range(len(items))], progress))


def reply_items(groups: list[dict]) -> list[tuple[str, str]]:
    return [(g["prompt"], r["text"]) for g in groups for r in g["replies"]]


def rm_result(groups: list[dict], cfg: JudgeConfig, res: list[Judged]) -> dict:
    """{"sampled": metrics, "expected": metrics | None, "records": per reply, counts} from each reply's Judged."""
    it = iter(res)                   # zip takes a group's replies first: `it` advances by the group's size
    per_group = [[{"group": g.get("id"), "rank": r["rank"], "scores": [s for _, s in j.samples],
                   "mean": mean_score([s for _, s in j.samples]), "judgment": j.samples[0][0],
                   **({"expected": j.expected} if cfg.expected else {})} for r, j in zip(g["replies"], it)]
                 for g in groups]

    def metrics(key: str) -> dict:
        return rm_metrics([([r["rank"] for r in rs], [r[key] for r in rs]) for rs in per_group])
    return {"sampled": metrics("mean"), "expected": metrics("expected") if cfg.expected else None,
            "judgments": sum(len(r.samples) for r in res), "prompts_cut": sum(r.prompt_cut for r in res),
            "parse_failures": sum(s is None for r in res for _, s in r.samples),
            "records": [r for rs in per_group for r in rs]}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


NAMES = {"pairwise_accuracy": "pairwise accuracy", "five_best": "5-best", "exact_match": "exact match",
         "spearman": "Spearman", "kendall_tau": "Kendall tau"}


def print_rm(res: dict, title: str = "") -> None:
    cols = ["sampled"] + (["expected"] if res.get("expected") else [])
    print(title)
    print(f"| metric | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for key, name in NAMES.items():
        print(f"| {name} | {' | '.join(_fmt(res[c][key]) for c in cols)} |")
    for key in ("groups_used", "pairs", "pairs_judge_tied"):
        print(f"| {key.replace('_', ' ')} | {' | '.join(str(res[c][key]) for c in cols)} |")
    s = res["sampled"]
    print(f"groups {s['groups']} (used {s['groups_used']}), pairs {s['pairs']} (judge-tied {s['pairs_judge_tied']}),"
          f" judgments {res['judgments']}, unparsable {res['parse_failures']}, perfect 5s {s['perfect_scores']},"
          f" judge prompts cut to fit the context {res['prompts_cut']}; Spearman/Kendall over {s['corr_groups']} groups"
          f" ({s['corr_skipped_human_tied']} skipped: human ranks all equal)")


def main(argv: list[str] | None = None) -> dict:
    a, ecfg, device, dtype = parse(argv, *_parser())
    check_not_input([getattr(a, k) for k in ("groups", "prompts", "judge_template", "pair_template")
                     if getattr(a, k, None)], [a.out])
    made = {"cmd": a.cmd, "seed": a.seed, "dtype": dtype, "limit": a.limit}

    def done(res: dict) -> dict:             # called under the command's lock
        res["settings"].update(device=device, dtype=dtype)
        write_json(a.out, res)
        return res
    return {"reward": _reward_cmd, "rm": _rm_cmd, "h2h": _h2h_cmd}[a.cmd](a, ecfg, made, done)


def _parser() -> tuple[argparse.ArgumentParser, set[str]]:
    from selfreward.infer.config import add_engine_flags
    ap = cli.Parser(description="reward-model metrics and head-to-head evaluation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rm = sub.add_parser("rm", help="judge held-out human-ranked groups; Table 4 metrics")
    rm.add_argument("--judge", required=True)
    rm.add_argument("--groups", required=True, help="groups JSONL from recipes.oasst (groups_eval.jsonl)")
    rm.add_argument("--judge-template")
    rm.add_argument("--k", type=int, default=3)
    hh = sub.add_parser("h2h", help="win / tie / loss of --a against --b, judged in both orders")
    for flag in ("--a", "--b", "--judge"):
        hh.add_argument(flag, required=True)
    hh.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    hh.add_argument("--pair-template")
    for p, temperature, top_p in ((rm, 0.7, 0.9), (hh, 0.0, 1.0)):   # h2h's replies: greedy by default
        p.add_argument("--temperature", type=float, default=temperature)
        p.add_argument("--top-p", type=float, default=top_p)
    hh.add_argument("--judge-temperature", type=float, default=0.0)
    rm.add_argument("--expected", action="store_true", help="also the expected score from the digit distribution")
    rw = sub.add_parser("reward", help="Table 4 metrics of a reward source (recipes.reward: rm, direct, judge)")
    rw.add_argument("--kind", choices=("rm", "direct", "judge"), default="rm")
    rw.add_argument("--model", required=True, help="the reward model, labeller or judge checkpoint")
    rw.add_argument("--groups", required=True)
    for p, chunk, what in ((rm, 64, "replies judged"), (hh, 128, "prompts answered and judged")):
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--chunk", type=int, default=chunk, help=f"{what} per engine call; each one's result "
                       "reaches its file's .partial once its chunk is done (a killed run resumes)")
    for p in (rm, hh, rw):
        p.add_argument("--limit", type=int, help="only the first N groups or prompts")
        p.add_argument("--out", required=True, help="JSON file for the results")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true",
                       help="start over when OUT was made with another model, input or settings")
        engine_dests = add_engine_flags(p)
    return ap, engine_dests


def _reward_cmd(a, ecfg, made: dict, done) -> dict:
    from selfreward.infer.config import resolve_device
    from selfreward.recipes.reward import load_reward
    groups = nonempty(load_groups(a.groups)[:a.limit], a.groups, "groups")
    device, dtype = resolve_device(ecfg)
    made.update(kind=a.kind, model_fingerprint=model_fingerprint(a.model), groups_hash=file_hash(a.groups))
    with claimed(a.out, made, [a.groups], a.overwrite):   # Table 4 metrics, each reply's reward as its score
        reward = load_reward(a.kind, a.model, device=device, dtype=dtype)
        items = reply_items(groups)
        it = iter(reward([p for p, _ in items], [r for _, r in items]))
        ranked = [([r["rank"] for r in g["replies"]], [next(it) for _ in g["replies"]]) for g in groups]
        res = {"metrics": rm_metrics(ranked, None if a.kind == "rm" else 1.0),   # an RM's score has no best grade
               "records": [{"group": g.get("id"), "rank": r["rank"], "reward": x}
                           for g, (_, xs) in zip(groups, ranked) for r, x in zip(g["replies"], xs)],
               "settings": {"kind": a.kind, "model": a.model, "groups": a.groups, "limit": a.limit}}
        m = res["metrics"]
        print(f"reward metrics ({a.kind} {a.model} on {a.groups}): " + ", ".join(f"{k} {_fmt(m[k])}" for k in NAMES)
              + f"; groups used {m['groups_used']}, pairs {m['pairs']}")
        return done(res)


def _rm_cmd(a, ecfg, made: dict, done) -> dict:
    from selfreward.recipes.session import Session
    groups = nonempty(load_groups(a.groups)[:a.limit], a.groups, "groups")
    cfg = _from_args(JudgeConfig, a, template=a.judge_template or "default")
    made.update(judge_fingerprint=model_fingerprint(a.judge), groups_hash=file_hash(a.groups), **made_by(cfg),
                rubric=hashlib.sha256(cfg.text.encode()).hexdigest()[:16])
    items, store = reply_items(groups), Path(f"{a.out}.judgments.jsonl")   # the claimed, resumable judgments

    def load():
        engine, tok = Session(ecfg).get(a.judge)
        check_fits(engine, tok, cfg)
        return engine, tok

    def judge(engine, tok, batch):           # reply j judged from seed + j * K, as rm_eval
        js, gen = [j for j, _ in batch], engine.stats["generated"]
        got = judge_items(engine, tok, [items[j] for j in js], cfg, [cfg.seed + j * cfg.k for j in js])
        per = (engine.stats["generated"] - gen) // len(js)
        return [({"i": j, "samples": r.samples, "prompt_cut": r.prompt_cut, "expected": r.expected}, per)
                for j, r in zip(js, got)]
    inputs = [a.groups] + ([a.judge_template] if a.judge_template and Path(a.judge_template).is_file() else [])
    with claimed(store, made, inputs, a.overwrite, also=[a.out]):
        recs = unit_records(store, [{"i": j} for j in range(len(items))], load, judge, a.chunk, "evaluate rm",
                            "replies")
        res = rm_result(groups, cfg, [Judged([tuple(x) for x in r["samples"]], r["prompt_cut"], r["expected"])
                                      for r in recs])
        res["settings"] = {"judge": a.judge, "groups": a.groups, **cli.to_dict(cfg)}
        print_rm(res, f"reward-model metrics: judge {a.judge} on {a.groups}")
        return done(res)


@dataclass
class H2HRun(H2HConfig):
    a: str = cli.checkpoint("")
    b: str = cli.checkpoint("")


def _from_args(cls, a, **kw):
    """`cls` from the parsed flags of its fields' names (a flag not given keeps the field's default)."""
    return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if getattr(a, f.name, None) is not None}, **kw)


def _h2h_cmd(a, ecfg, made: dict, done) -> dict:
    """A's replies, B's replies, then the verdicts, each a resumable file in OUT.h2h, a unit a prompt: a killed
    run's rerun does only what is missing; one model in memory at a time."""
    from selfreward.recipes.h2h import generate_responses, h2h_result, pair_verdicts, read_prompts
    from selfreward.recipes.session import Session
    cfg = _from_args(H2HRun, a)
    prompts = nonempty(read_prompts(a.prompts, a.limit), a.prompts, "prompts")
    work, session, units = Path(f"{a.out}.h2h"), Session(ecfg), [{"i": i} for i in range(len(prompts))]

    def stage(name: str, model: str, fn) -> list[dict]:
        return unit_records(work / f"{name}.jsonl", units, lambda: session.get(model),
                            lambda eng, tok, batch: [(r, 0) for r in fn(eng, tok, [i for i, _ in batch])],
                            a.chunk, f"h2h {name}", "prompts")

    def replies(eng, tok, idx):
        texts = generate_responses(eng, tok, [prompts[i] for i in idx], cfg, progress=True, index=idx)
        return [{"i": i, "text": t} for i, t in zip(idx, texts)]
    with claimed(work, {**made, **made_by(cfg)}, [a.prompts] + ([a.pair_template] if a.pair_template else []),
                 a.overwrite, folder=True, also=[a.out]):
        resp_a = [r["text"] for r in stage("replies_a", a.a, replies)]
        resp_b = [r["text"] for r in stage("replies_b", a.b, replies)]
        res = h2h_result(prompts, resp_a, resp_b, stage("verdicts", a.judge, lambda eng, tok, idx: pair_verdicts(
            eng, tok, prompts, resp_a, resp_b, idx, cfg, progress=True)))
        res["settings"] = cli.to_dict(cfg)
        print(f"| A vs B | win | tie | loss | n |\n|---|---|---|---|---|\n| {a.a} vs {a.b} | {_fmt(res['win'])} | "
              f"{_fmt(res['tie'])} | {_fmt(res['loss'])} | {res['n']} |  (no verdict: {res['no_verdict']})")
        return done(res)


if __name__ == "__main__":
    cli.run_main(main)
