"""RLAIF (Lee et al., 2023; PAPER_NOTES section 3), part 1: AI preference labels read from the engine's
next-token probabilities, and direct 1-10 scoring. No label is parsed from sampled text.

A label prompt is a chat: the system turn is the PREAMBLE (the task and what makes a good answer: one shared
prefix, so the engine's prefix cache computes it once for every request); the user turn is the sample
(context, response 1, response 2); the assistant turn is forced to begin with the ENDING ("Preferred
response:"). The label is the softmax over the log-probabilities of the option tokens "1" and "2" at the
next position: a soft label [P(1), P(2)]. Each pair is labelled in both orders; the label of response 1 is
the mean of P("1") with it shown first and P("2") with it shown second, which cancels a labeller that
prefers a position. Chain-of-thought (`cot`): the user turn also asks for reasons; the assistant's rationale
is sampled up to the ending, and the label is read after rationale + ending.

Direct scoring: the assistant turn is forced to "Score:", and the score is sum_i i * P(i) over the options
"1".."10" renormalised, rescaled to [-1, 1] as (E - 5.5) / 4.5. "10" is handled by scoring each option's
FULL token sequence by teacher forcing (one next-token read when every option is one token). Where a
tokenizer splits "10" into "1" + "0", the option "1" is a prefix of "10": P("1") is then taken as the
probability of "1" NOT continued by "0", P(1 then anything) - P(1 then 0), so the options are disjoint.

Templates (ours): a JSON file with any of the keys of LabelTemplate / ScoreTemplate replaces the defaults.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from selfreward.records import DataError
from selfreward.recipes.options import PrefillMeter, forced_options, option_probs


@dataclass
class LabelTemplate:
    preamble: str = ("You compare two replies of an AI assistant to the same conversation. The better reply "
                     "is the one that helps the user more: correct, relevant, complete and clear, with "
                     "nothing that does not belong. Neither the order of the replies nor their length "
                     "should sway you.")
    sample: str = "Conversation:\n{context}\n\nResponse 1:\n{response_1}\n\nResponse 2:\n{response_2}"
    ending: str = "Preferred response:"
    cot_request: str = "\n\nFirst explain which reply is better and why, then name it."

    def check(self, where: str = "label template") -> None:
        for slot in ("{context}", "{response_1}", "{response_2}"):
            if slot not in self.sample:
                raise DataError(f"{where}: field 'sample' lacks placeholder {slot}")


@dataclass
class ScoreTemplate:
    preamble: str = ("You rate one reply of an AI assistant from 1 (useless or wrong) to 10 (correct, "
                     "relevant, complete and clear, with nothing that does not belong).")
    sample: str = "Conversation:\n{context}\n\nReply:\n{response}"
    ending: str = "Score:"

    def check(self, where: str = "score template") -> None:
        for slot in ("{context}", "{response}"):
            if slot not in self.sample:
                raise DataError(f"{where}: field 'sample' lacks placeholder {slot}")


def load_template(cls, path: str | Path | None):
    """The default (None) or a JSON file holding some of the template's fields."""
    if path is None:
        return cls()
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    known = {f.name for f in fields(cls)}
    bad = [k for k in raw if k not in known or not isinstance(raw[k], str)] if isinstance(raw, dict) else ["?"]
    if bad:
        raise DataError(f"{path}: field '{bad[0]}' is not a text field of {cls.__name__} ({sorted(known)})")
    t = replace(cls(), **raw)
    t.check(str(path))
    return t


def _chat_ids(tok, system: str, user: str) -> list[int]:
    ids, _ = tok.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}],
                             add_generation_prompt=True)
    return ids


def _fit(tok, system: str, sample: str, vals: dict[str, str], budget: int) -> tuple[list[int], bool]:
    """Chat ids of (system, sample filled with vals), the longest value cut until it fits `budget` tokens."""
    fill = lambda v: _fill(sample, v)  # noqa: E731
    ids = _chat_ids(tok, system, fill(vals))
    if len(ids) <= budget:
        return ids, False
    cur = dict(vals)
    for _ in range(80):
        k = max(cur, key=lambda k: len(cur[k]))
        if not cur[k]:
            break
        cur[k] = cur[k][:max(0, len(cur[k]) - max(8, (len(ids) - budget) * 3))]
        ids = _chat_ids(tok, system, fill({k: v + " [...]" if v != vals[k] else v for k, v in cur.items()}))
        if len(ids) <= budget:
            return ids, True
    raise DataError(f"the label prompt does not fit in {budget} tokens even with empty slots")


def _fill(sample: str, vals: dict[str, str]) -> str:
    import re
    return re.sub(r"\{(\w+)\}", lambda m: vals.get(m.group(1), m.group(0)), sample)


@dataclass
class LabelConfig:
    cot: bool = False                 # sample a rationale first, read the label after it
    cot_max_tokens: int = 128
    cot_temperature: float = 0.0      # the paper's labeller decodes at temperature 0
    seed: int = 0
    template: LabelTemplate = None    # None = LabelTemplate()


def soft_labels(engine, tok, items: list[tuple[str, str, str]], cfg: LabelConfig | None = None) -> dict:
    """items: (context, response_1, response_2). -> {"records": per item {label [p1, p2], p_first (in the
    given order), p_first_swapped, rationales?}, "prefill": counters, "prompts_cut": n}."""
    from selfreward.infer.sequence import SamplingParams
    cfg = cfg or LabelConfig()
    t = cfg.template or LabelTemplate()
    meter = PrefillMeter(engine)
    user = t.sample + (t.cot_request if cfg.cot else "")
    reserve = len(forced_options(tok, t.ending, ["1", "2"])[0]) + 4 + (cfg.cot_max_tokens if cfg.cot else 0)
    budget = engine.max_len - reserve
    orders = [(c, a, b) for c, a, b in items] + [(c, b, a) for c, a, b in items]     # given, then swapped
    fitted = [_fit(tok, t.preamble, user, {"context": c, "response_1": x, "response_2": y}, budget)
              for c, x, y in orders]
    base = [f[0] for f in fitted]
    texts = [t.ending] * len(base)
    rationales = None
    if cfg.cot:
        ps = [SamplingParams(temperature=cfg.cot_temperature, max_tokens=cfg.cot_max_tokens, seed=cfg.seed + i,
                             stop=[t.ending]) for i in range(len(base))]
        rationales = [g[0].text.strip() for g in engine.generate(base, ps)]
        texts = [f"{r} {t.ending}" if r else t.ending for r in rationales]
    heads = [forced_options(tok, x, ["1", "2"]) for x in texts]
    groups: dict[tuple, list[int]] = {}       # one batched read per distinct pair of option tails
    for i, (_, tails) in enumerate(heads):
        groups.setdefault(tuple(map(tuple, tails)), []).append(i)
    probs: list[list[float]] = [[]] * len(base)
    for tails, idx in groups.items():
        got = option_probs(engine, [base[i] + heads[i][0] for i in idx], [list(x) for x in tails])
        for i, p in zip(idx, got):
            probs[i] = p
    n = len(items)
    records = []
    for i in range(n):
        p_first, p_first_sw = probs[i][0], probs[n + i][0]
        p1 = (p_first + (1 - p_first_sw)) / 2          # response 1 first, then response 1 second
        rec = {"label": [p1, 1 - p1], "p_first": p_first, "p_first_swapped": p_first_sw}
        if rationales is not None:
            rec["rationales"] = [rationales[i], rationales[n + i]]
        records.append(rec)
    return {"records": records, "prefill": meter.read(), "prompts_cut": sum(f[1] for f in fitted)}


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
    meter = PrefillMeter(engine)
    options = [str(i) for i in range(1, 11)]
    head, tails = forced_options(tok, t.ending, options)
    budget = engine.max_len - len(head) - max(map(len, tails)) - 2
    ids = [_fit(tok, t.preamble, t.sample, {"context": c, "response": r}, budget)[0] + head for c, r in items]
    records = []
    for p in option_probs(engine, ids, tails):
        e = sum((i + 1) * q for i, q in enumerate(p))
        records.append({"reward": (e - 5.5) / 4.5, "expected": e, "probs": p})
    return {"records": records, "prefill": meter.read(), "tokens_per_option": [len(x) for x in tails]}


def settings(cfg: LabelConfig) -> dict:
    return {k: v for k, v in asdict(replace(cfg, template=None)).items() if k != "template"}


def group_pairs(groups: list[dict], limit: int | None = None) -> list[dict]:
    """Human-ranked groups (recipes.oasst) -> every pair of replies with different ranks, better-ranked first
    in `human` order only (the labeller sees response_1 / response_2 as written here)."""
    out = []
    for g in groups:
        reps = g["replies"]
        for i in range(len(reps)):
            for j in range(i + 1, len(reps)):
                if reps[i]["rank"] != reps[j]["rank"]:
                    out.append({"id": f"{g.get('id', len(out))}:{i}:{j}", "prompt": g["prompt"],
                                "response_1": reps[i]["text"], "response_2": reps[j]["text"],
                                "human_ranks": [reps[i]["rank"], reps[j]["rank"]]})
    return out[:limit]


def main(argv: list[str] | None = None) -> dict:
    """python -m selfreward.recipes.rlaif label --labeller DIR (--pairs P.jsonl | --groups G.jsonl) --out L.jsonl
    [--cot] [--template T.json] [--limit N]: soft labels in both orders (records + `label`, `p_first`, ...),
    a summary JSON beside the output (position bias, prefill saved, agreement with human ranks if given)."""
    import argparse
    import sys
    from selfreward.records import field, iter_jsonl, nonempty, write_json, write_jsonl
    ap = argparse.ArgumentParser(description="RLAIF soft preference labels")
    ap.add_argument("cmd", choices=["label"])
    ap.add_argument("--labeller", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="JSONL with prompt, response_1, response_2")
    src.add_argument("--groups", help="human-ranked groups JSONL (recipes.oasst groups_*.jsonl)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cot", action="store_true")
    ap.add_argument("--cot-max-tokens", type=int, default=128)
    ap.add_argument("--template", help="JSON file with LabelTemplate fields")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        t = load_template(LabelTemplate, a.template)
        if a.groups:
            from selfreward.recipes.evaluate import load_groups
            pairs = group_pairs(load_groups(a.groups), a.limit)
        else:
            pairs = []
            for i, r in iter_jsonl(a.pairs):
                for k in ("prompt", "response_1", "response_2"):
                    field(r, k, f"{a.pairs}:{i}")
                pairs.append(r)
            pairs = pairs[:a.limit]
        nonempty(pairs, a.pairs or a.groups, "pairs")
        from selfreward.provenance import check_not_input
        check_not_input([a.pairs or a.groups], [a.out, str(a.out) + ".summary.json"])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from selfreward.infer.engine import Engine
    from selfreward.model.tokenizer import Tokenizer
    engine, tok = Engine.from_pretrained(a.labeller), Tokenizer.load(a.labeller)
    cfg = LabelConfig(cot=a.cot, cot_max_tokens=a.cot_max_tokens, seed=a.seed, template=t)
    res = soft_labels(engine, tok, [(p["prompt"], p["response_1"], p["response_2"]) for p in pairs], cfg)
    recs = [dict(p, **r) for p, r in zip(pairs, res["records"])]
    write_jsonl(a.out, recs)
    human = [r for r in recs if "human_ranks" in r]
    summary = {"pairs": len(recs), "position_bias": position_bias(res["records"]), "prefill": res["prefill"],
               "prompts_cut": res["prompts_cut"], "settings": settings(cfg), "labeller": a.labeller,
               "human_agreement": sum((r["label"][0] > 0.5) == (r["human_ranks"][0] < r["human_ranks"][1])
                                      for r in human) / len(human) if human else None}
    write_json(str(a.out) + ".summary.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    from selfreward.cli import run_main
    run_main(main)
