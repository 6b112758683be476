"""From judgments to preference pairs, and the per-iteration statistics the manifest records."""

from collections import Counter, defaultdict
from statistics import mean
from typing import Sequence

from selfreward.recipes.judge import mean_scores


PAIRINGS = ("best-worst", "best-rest")


def build_pairs(prompts: Sequence[dict], candidates: Sequence[dict], judgments: Sequence[dict],
                key: str = "score", pool_identical: bool = True, min_margin: float = 0.0,
                pairing: str = "best-worst", length_control: float = 0.0) -> tuple[list[dict], Counter]:
    """Preference pairs from the candidates' mean scores over their K judgments (`key`: "score" or
    "expected"). pairing "best-worst" (the paper): per prompt its highest- against its lowest-scored candidate;
    "best-rest": the best against each lower-scored distinct text (with the checker's scores, every
    right-vs-wrong pair). Candidates with no parsable judgment are left out (not losers); a prompt with fewer
    than two scored candidates, or whose best and worst tie, gives no pair; among equal scores the lowest
    sample index is taken. pool_identical: candidates with the very same text are one response (judgments
    pooled), so chosen and rejected always differ. min_margin > 0 drops pairs closer than that (counted
    "below_margin"; the paper keeps every untied pair). length_control rho > 0 (Meta-Rewarding's length control):
    the chosen is the shortest text (tokens, else characters) scored within rho x (best - worst) of the best,
    so a longer text must score clearly higher to be chosen (counted "length_controlled" when that is not the
    best-scored). Returns (pairs, counts)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, not {pairing!r}")
    cand_text = {(c["id"], c["sample"]): c["text"] for c in candidates}
    score = mean_scores(judgments, key, lambda j: (j["id"], cand_text.get((j["id"], j["sample"])) if pool_identical
                                                   else j["sample"]))
    text = {r["id"]: r["prompt"] for r in prompts}
    cands: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        cands[c["id"]].append(c)
    pairs, counts = [], Counter()
    for pid in text:
        seen, scored = set(), []
        for c in sorted(cands.get(pid, []), key=lambda c: c["sample"]):
            ident = c["text"] if pool_identical else c["sample"]
            if ident in seen:
                counts["identical_merged"] += 1
                continue
            seen.add(ident)
            scored.append((score.get((pid, ident)), c))
        counts["candidates_unscored"] += sum(s is None for s, _ in scored)
        scored = [(s, c) for s, c in scored if s is not None]
        if len(scored) < 2:
            counts["prompts_too_few_scored"] += 1
            continue
        hi, lo = max(scored, key=lambda x: x[0]), min(scored, key=lambda x: x[0])   # first of equals: lowest sample
        if hi[0] == lo[0]:
            counts["ties"] += 1
            continue
        if length_control > 0:
            near = [x for x in scored if x[0] >= hi[0] - length_control * (hi[0] - lo[0])]
            short = min(near, key=lambda x: (x[1].get("n_tokens", len(x[1]["text"])), x[1]["sample"]))
            counts["length_controlled"] += short is not hi
            hi = short
        if hi[0] - lo[0] < min_margin:
            counts["below_margin"] += 1
            continue
        losers = [lo] if pairing == "best-worst" else \
            [x for x in scored if x[0] < hi[0] and hi[0] - x[0] >= min_margin]
        pairs += [_pair(pid, text[pid], hi, x) for x in losers]
        counts["prompts_paired"] += 1
    counts["pairs"] = len(pairs)
    return pairs, counts


def _pair(pid: str, prompt: str, hi: tuple, lo: tuple) -> dict:
    pair = {"id": pid, "prompt": prompt, "chosen": hi[1]["text"], "rejected": lo[1]["text"],
            "chosen_score": hi[0], "rejected_score": lo[0], "chosen_sample": hi[1]["sample"],
            "rejected_sample": lo[1]["sample"]}
    if "token_ids" in hi[1] and "token_ids" in lo[1]:   # as sampled: DPO trains on these, not re-encoded text
        pair.update(chosen_token_ids=hi[1]["token_ids"], rejected_token_ids=lo[1]["token_ids"])
    return pair


def distinct_candidates(cands: list[dict]) -> list[dict]:
    """The candidates worth judging when identical texts are pooled (as build_pairs does): the first sample of
    each distinct text, on prompts with at least two distinct texts (one text can make no pair)."""
    by: dict[str, dict[str, dict]] = {}
    for c in sorted(cands, key=lambda c: c["sample"]):
        by.setdefault(c["id"], {}).setdefault(c["text"], c)
    return [c for texts in by.values() if len(texts) > 1 for c in texts.values()]


def _hist(values) -> dict[str, int]:
    return {f"{k:g}": v for k, v in sorted(Counter(values).items())}


def _mean(xs: list) -> float | None:
    return round(mean(xs), 2) if xs else None


def iteration_stats(prompts: Sequence[dict], candidates: Sequence[dict], judgments: Sequence[dict],
                    pairs: Sequence[dict], pair_counts: Counter | dict) -> dict:
    """Counts, score histograms and mean lengths of one iteration (what the manifest holds)."""
    verdicts, scores = Counter(p.get("verdict", "ok") for p in prompts), mean_scores(judgments)
    first = [j for j in judgments if j.get("k") == 0]
    exp = [j["expected"] for j in first if "expected" in j]
    counts = {"prompts": verdicts.get("ok", 0), "prompts_made": len(prompts),
              "prompts_filtered": {k: v for k, v in sorted(verdicts.items()) if k != "ok"},
              "candidates": len(candidates), "judgments": len(judgments),
              "parse_failures": sum(j["score"] is None for j in judgments),
              **{k: pair_counts.get(k, 0) for k in ("candidates_unscored", "prompts_too_few_scored", "ties",
                                                    "below_margin", "identical_merged", "length_controlled")},
              "pairs": len(pairs), "prompts_paired": pair_counts.get("prompts_paired", len({p["id"] for p in pairs})),
              "judge_prompts_cut": sum(bool(j.get("prompt_cut")) for j in first)}
    return {
        **({"expected_score_mean": round(mean(exp), 4)} if exp else {}),
        "counts": counts,
        "score_histogram": _hist(j["score"] for j in judgments if j["score"] is not None),
        "mean_score_histogram": _hist(round(s, 2) for s in scores.values() if s is not None),
        # the expected score (one value per candidate), in bins of 0.5: 2.3 counts under 2.5
        "expected_score_histogram": _hist(round(e * 2) / 2 for e in exp if e is not None),
        "mean_len": {"candidate_chars": _mean([len(c["text"]) for c in candidates]),
                     "candidate_tokens": _mean([c["n_tokens"] for c in candidates if "n_tokens" in c]),
                     "chosen_chars": _mean([len(p["chosen"]) for p in pairs]),
                     "rejected_chars": _mean([len(p["rejected"]) for p in pairs]),
                     "judgment_chars": _mean([len(j["judgment"]) for j in judgments])},
    }
