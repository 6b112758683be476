"""RLAIF (Lee et al., 2023; PAPER_NOTES section 3), part 1: AI preference labels (both orders, optionally after
a rationale) and direct 1-10 scores, both read as forced choices (recipes/prompts.py), never parsed from sampled
text; the `label` CLI. The method: recipes/README.md, "RLAIF, part 1".
"""

import json
from itertools import combinations
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from selfreward.cli import Parser
from selfreward.provenance import check_not_input, file_hash, made_by, model_fingerprint
from selfreward.records import DataError, field, iter_jsonl, nonempty, write_json
from selfreward.recipes.judge import expected_scores
from selfreward.recipes.pipeline import claimed, parse, unit_records
from selfreward.recipes.prompts import (check_slots, fill, fit_prompt, forced_options, load_template,
                                       option_probs)


@dataclass
class LabelTemplate:
    preamble: str = ("You compare two replies of an AI assistant to the same conversation. The better reply "
                     "is the one that helps the user more: correct, relevant, complete and clear, with "
                     "nothing that does not belong. Neither the order of the replies nor their length "
                     "should sway you.")
    exemplars: str = ""               # few-shot examples, between the preamble and the sample (paper's slot)
    sample: str = "Conversation:\n{context}\n\nResponse 1:\n{response_1}\n\nResponse 2:\n{response_2}"
    ending: str = "Preferred response:"
    cot_request: str = "\n\nFirst explain which reply is better and why, then name it."
    # --checks: each reply is checked alone (`check`, a chat of its own), and the two checks, joined by
    # `check_rationale`, are the rationale the label is read after
    check: str = ("Check this reply of an AI assistant step by step: is it correct, relevant, complete and "
                  "clear?\n\nConversation:\n{context}\n\nReply:\n{response}")
    check_rationale: str = "Check of response 1: {check_1}\nCheck of response 2: {check_2}\n"
    SLOTS: ClassVar = ("context", "response_1", "response_2")

    def check_checks(self, where: str = "template") -> None:
        """The slots --checks needs: {context} and {response} in `check`, {check_1} and {check_2} in
        `check_rationale`."""
        check_slots(self.check, ("context", "response"), f"{where}: field 'check'")
        check_slots(self.check_rationale, ("check_1", "check_2"), f"{where}: field 'check_rationale'")


@dataclass
class ScoreTemplate:
    preamble: str = ("You rate one reply of an AI assistant from 1 (useless or wrong) to 10 (correct, "
                     "relevant, complete and clear, with nothing that does not belong).")
    sample: str = "Conversation:\n{context}\n\nReply:\n{response}"
    ending: str = "Score:"
    SLOTS: ClassVar = ("context", "response")


def read_template(cls, path: str | Path | None):
    """A LabelTemplate / ScoreTemplate: the default (None) or a JSON file holding some of its fields."""
    t = load_template(path, cls(), cls.SLOTS)
    if isinstance(t, LabelTemplate):
        t.check_checks(str(path))
    return t


def prefill_since(engine, start: dict) -> dict:
    """Prefill tokens computed vs served from the prefix cache since `start` (a copy of engine.stats)."""
    comp, hit = (engine.stats[k] - start[k] for k in ("prefill_computed", "prefix_hit"))
    return {"prefill_computed": comp, "prefix_hit": hit, "saved": hit / (comp + hit) if comp + hit else None}


@dataclass
class LabelConfig:
    cot: bool = False                 # sample a rationale first, read the label after it
    checks: bool = False              # the rationale is the labeller's check of each reply alone (implies cot)
    cot_max_tokens: int = 128         # the rationale's tokens (with checks: each check's)
    cot_temperature: float = 0.0      # the paper's labeller decodes at temperature 0
    seed: int = 0
    template: LabelTemplate = None    # None = LabelTemplate()


def soft_labels(engine, tok, items: list[tuple[str, str, str]], cfg: LabelConfig | None = None,
                index: list[int] | None = None) -> dict:
    """items: (context, response_1, response_2). -> {"records": per item {label [p1, p2], p_first (in the
    given order), p_first_swapped, prompts_cut (0-2: of its two orders' prompts), rationales?}, "prefill":
    counters, "prompts_cut": n, "prompt_tokens": per item, both orders}. `index`: each item's place in the
    whole job (default 0..n-1): a rationale's sampling seed is seed + 2 * index (+ 1 for the swapped order),
    so a job cut into chunks, or resumed, samples what one call over every item would."""
    from selfreward.infer.sequence import SamplingParams
    cfg = cfg or LabelConfig()
    t = cfg.template or LabelTemplate()
    start = dict(engine.stats)
    index = list(range(len(items))) if index is None else list(index)
    cot = cfg.cot or cfg.checks
    user = t.exemplars + t.sample + (t.cot_request if cot else "")
    orders = [(c, a, b) for c, a, b in items] + [(c, b, a) for c, a, b in items]     # given, then swapped
    head = len(forced_options(tok, t.ending, ["1", "2"])[0]) + 4
    if cfg.checks:
        rationales = _checked_rationales(engine, tok, items, index, cfg, t)
        budgets = [engine.max_len - head - len(tok.encode(f"{r} {t.ending}")) for r in rationales]
    else:
        budgets = [engine.max_len - head - cot * cfg.cot_max_tokens] * len(orders)
    fitted = [fit_prompt(tok, user, {"context": c, "response_1": x, "response_2": y}, bud, t.preamble)
              for (c, x, y), bud in zip(orders, budgets)]
    base = [f[0] for f in fitted]
    if cot and not cfg.checks:
        seeds = [cfg.seed + 2 * j for j in index] + [cfg.seed + 2 * j + 1 for j in index]
        ps = [SamplingParams(temperature=cfg.cot_temperature, max_tokens=cfg.cot_max_tokens, seed=sd,
                             stop=[t.ending]) for sd in seeds]
        rationales = [g[0].text.strip() for g in engine.generate(base, ps)]
    texts = [f"{r} {t.ending}" if r else t.ending for r in rationales] if cot else t.ending
    probs = option_probs(engine, tok, base, texts, ["1", "2"])
    n, records = len(items), []
    for i in range(n):
        p_first, p_first_sw = probs[i][0], probs[n + i][0]
        p1 = (p_first + (1 - p_first_sw)) / 2          # response 1 first, then response 1 second
        records.append({"label": [p1, 1 - p1], "p_first": p_first, "p_first_swapped": p_first_sw,
                        "prompts_cut": int(fitted[i][1]) + int(fitted[n + i][1]),
                        **({"rationales": [rationales[i], rationales[n + i]]} if cot else {})})
    return {"records": records, "prefill": prefill_since(engine, start), "prompts_cut": sum(f[1] for f in fitted),
            "prompt_tokens": [len(base[i]) + len(base[n + i]) for i in range(n)]}


def _checked_rationales(engine, tok, items, index, cfg: LabelConfig, t: LabelTemplate) -> list[str]:
    """Each reply checked alone by the labeller (`t.check`, no system turn, as the judge's own prompt), greedy
    by default; the rationale of each order names the checks by that order's numbering (given orders, then
    swapped). A check's seed is seed + 2 * index (+ 1 for the second reply)."""
    from selfreward.infer.sequence import SamplingParams
    t.check_checks()
    budget = engine.max_len - cfg.cot_max_tokens - 2
    ids = [fit_prompt(tok, t.check, {"context": c, "response": r}, budget)[0] for c, a, b in items for r in (a, b)]
    ps = [SamplingParams(temperature=cfg.cot_temperature, max_tokens=cfg.cot_max_tokens, seed=cfg.seed + 2 * j + k)
          for j in index for k in (0, 1)]
    checks = [g[0].text.strip() for g in engine.generate(ids, ps)]
    pairs = list(zip(checks[0::2], checks[1::2]))
    return ([fill(t.check_rationale, check_1=a, check_2=b).strip() for a, b in pairs]
            + [fill(t.check_rationale, check_1=b, check_2=a).strip() for a, b in pairs])


def position_bias(records: list[dict]) -> dict:
    """Share of pairs whose label prefers the response shown first (ties count half): from the given order
    alone, and from the label averaged over both orders (always 0.5 for a labeller that only sees positions)."""
    def share(ps):   # |p - 0.5| < 1e-9 is a tie (the two orders' mean is rounded)
        return sum(0.5 if abs(p - 0.5) < 1e-9 else float(p > 0.5) for p in ps) / len(ps) if ps else None
    return {"one_order": share([r["p_first"] for r in records]),
            "both_orders": share([r["label"][0] for r in records]),
            "order_consistent": share([1.0 if (r["p_first"] > 0.5) == (r["p_first_swapped"] < 0.5) else 0.0
                                       for r in records])}


def direct_scores(engine, tok, items: list[tuple[str, str]], template: ScoreTemplate | None = None) -> dict:
    """items: (context, response). -> {"records": [{"reward" in [-1, 1], "expected" in [1, 10], "probs"}],
    "prefill": counters}."""
    t = template or ScoreTemplate()
    start = dict(engine.stats)
    options = [str(i) for i in range(1, 11)]
    head, tails = forced_options(tok, t.ending, options)
    budget = engine.max_len - len(head) - max(map(len, tails)) - 2
    ids = [fit_prompt(tok, t.sample, {"context": c, "response": r}, budget, t.preamble)[0] for c, r in items]
    records = [{"reward": (e - 5.5) / 4.5, "expected": e, "probs": p}
               for e, p in expected_scores(engine, tok, ids, t.ending, 1, 10)]
    return {"records": records, "prefill": prefill_since(engine, start), "tokens_per_option": [len(x) for x in tails]}


def group_pairs(groups: list[dict], limit: int | None = None) -> list[dict]:
    """Human-ranked groups (recipes.oasst) -> every pair of replies with different ranks, better-ranked first
    in `human` order only (the labeller sees response_1 / response_2 as written here)."""
    out = []
    for g in groups:
        for (i, a), (j, b) in combinations(enumerate(g["replies"]), 2):
            if a["rank"] != b["rank"]:
                out.append({"id": f"{g.get('id', len(out))}:{i}:{j}", "prompt": g["prompt"], "response_1": a["text"],
                            "response_2": b["text"], "human_ranks": [a["rank"], b["rank"]]})
    return out[:limit]


def read_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """--pairs JSONL -> the first `limit` pairs, each checked (file:line and field named); a pair without an
    `id` gets its 0-based place in the file, and ids must be unique (they key the resumable output)."""
    pairs, seen = [], {}
    for i, r in iter_jsonl(path):
        for k in ("prompt", "response_1", "response_2"):
            field(r, k, f"{path}:{i}")
        if "id" in r and (isinstance(r["id"], bool) or not isinstance(r["id"], (str, int))):
            raise DataError(f"{path}:{i}: field 'id': not a string / integer")
        r.setdefault("id", len(pairs))
        k = json.dumps(r["id"])
        if k in seen:
            raise DataError(f"{path}:{i}: field 'id': duplicate {r['id']!r} (first on line {seen[k]})")
        seen[k] = i
        pairs.append(r)
    return pairs[:limit]


def main(argv: list[str] | None = None) -> dict:
    """python -m selfreward.recipes.rlaif label --labeller DIR (--pairs P.jsonl | --groups G.jsonl) --out L.jsonl
    [--cot] [--template T.json]: soft labels in both orders and L.jsonl.summary.json (recipes/README.md)."""
    from selfreward.infer.config import add_engine_flags
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.session import Session
    ap = Parser(description="RLAIF soft preference labels")
    ap.add_argument("cmd", choices=["label"])
    ap.add_argument("--labeller", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL with prompt, response_1, response_2 (and an optional id)")
    src.add_argument("--groups", help="human-ranked groups JSONL (recipes.oasst groups_*.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cot", action="store_true")
    ap.add_argument("--checks", action="store_true", help="the rationale is the labeller's check of each reply "
                    "alone (the template's `check`, greedy), joined by its `check_rationale`; implies --cot")
    ap.add_argument("--cot-max-tokens", type=int, default=128)
    ap.add_argument("--template", help="JSON file with LabelTemplate fields")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=64, help="pairs per engine call; each pair's label is "
                    "flushed to OUT.partial once its chunk is done, so a killed run loses at most a chunk")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over when OUT (or its .partial) was made with another labeller, input or settings")
    a, ecfg, _, dtype = parse(argv, ap, add_engine_flags(ap))
    t = read_template(LabelTemplate, a.template)
    from selfreward.recipes.evaluate import load_groups
    source = a.pairs or a.groups
    pairs = nonempty(group_pairs(load_groups(a.groups), a.limit) if a.groups else read_pairs(a.pairs, a.limit),
                     source, "pairs")
    out, summary_path = Path(a.out), Path(str(a.out) + ".summary.json")
    check_not_input([source], [out, summary_path])
    if not Path(a.labeller).is_dir():
        raise DataError(f"--labeller {a.labeller}: not a checkpoint folder")
    forced_options(Tokenizer.load(a.labeller), t.ending, ["1", "2"])   # the options readable, before any file
    cfg = LabelConfig(cot=a.cot, checks=a.checks, cot_max_tokens=a.cot_max_tokens, seed=a.seed, template=t)
    made = {"labeller_fingerprint": model_fingerprint(a.labeller), "input_hash": file_hash(source),
            "input_kind": "groups" if a.groups else "pairs", "limit": a.limit, "settings": made_by(cfg),
            "dtype": dtype}
    run: dict = {"labelled": 0}

    def label(engine, tok, batch):
        run.setdefault("start", (engine, dict(engine.stats)))
        run["labelled"] += len(batch)
        res = soft_labels(engine, tok, [(p["prompt"], p["response_1"], p["response_2"]) for _, p in batch], cfg,
                          index=[i for i, _ in batch])
        return [(dict(p, **r), n) for (_, p), r, n in zip(batch, res["records"], res["prompt_tokens"])]
    with claimed(out, made, [source], a.overwrite, also=[summary_path]):
        recs = unit_records(out, pairs, lambda: Session(ecfg).get(a.labeller), label, a.chunk, "rlaif label",
                            "pairs", key=lambda r: json.dumps(r["id"]))
        human = [r for r in recs if "human_ranks" in r]
        summary = {"pairs": len(recs), "position_bias": position_bias(recs),
                   "prompts_cut": sum(r.get("prompts_cut", 0) for r in recs), "settings": made["settings"],
                   "labeller": a.labeller, "dtype": dtype, "labelled_by_this_run": run["labelled"],
                   "prefill": prefill_since(*run["start"]) if "start" in run else None,
                   "human_agreement": sum((r["label"][0] > 0.5) == (r["human_ranks"][0] < r["human_ranks"][1])
                                          for r in human) / len(human) if human else None}
        write_json(summary_path, summary)      # under the lock, as the labels
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    from selfreward.cli import run_main
    run_main(main)
