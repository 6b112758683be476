"""Soft preference labels against the checker: agreement and a reliability table.

Both use the pairs where exactly one response is right (the checker's truth is then a preference); a
pair's label is P(response 1 is better). A label of exactly 0.5 counts half.
"""
from __future__ import annotations


def _one_right(pairs: list[dict], recs: list[dict]) -> list[tuple[dict, dict]]:
    return [(p, r) for p, r in zip(pairs, recs) if sum(p["right"]) == 1]


def _hit(prob_first: float, first_right: bool) -> float:
    if abs(prob_first - 0.5) < 1e-9:      # a tie, up to the rounding of the two orders' mean
        return 0.5
    return float((prob_first > 0.5) == first_right)


def agreement(pairs: list[dict], recs: list[dict]) -> dict:
    """How often the higher-probability response is the right one: from the given order alone
    (p_first) and from the label averaged over both orders."""
    sel = _one_right(pairs, recs)
    if not sel:
        return {"one_order": None, "both_orders": None, "pairs": 0}
    one = sum(_hit(r["p_first"], bool(p["right"][0])) for p, r in sel) / len(sel)
    both = sum(_hit(r["label"][0], bool(p["right"][0])) for p, r in sel) / len(sel)
    return {"one_order": one, "both_orders": both, "pairs": len(sel)}


def reliability(pairs: list[dict], recs: list[dict], bins: int = 5) -> dict:
    """Bins of the soft label P(response 1 better): pairs, mean label, share where response 1 is right;
    ECE = the pair-weighted mean |mean label - share|. Also the mean confidence max(p, 1 - p) on pairs where
    both are wrong (no truth: a calibrated labeller stays near 0.5 there)."""
    sel = _one_right(pairs, recs)
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        xs = [(r["label"][0], float(p["right"][0])) for p, r in sel
              if lo <= r["label"][0] < hi or (b == bins - 1 and r["label"][0] == 1.0)]
        if xs:
            table.append({"bin": [round(lo, 3), round(hi, 3)], "pairs": len(xs),
                          "mean_label": sum(x for x, _ in xs) / len(xs), "share_right": sum(y for _, y in xs) / len(xs)})
    n = sum(row["pairs"] for row in table)
    ece = sum(row["pairs"] * abs(row["mean_label"] - row["share_right"]) for row in table) / n if n else None
    wrong = [max(r["label"]) for p, r in zip(pairs, recs) if sum(p["right"]) == 0]
    return {"table": table, "ece": ece,
            "both_wrong_confidence": sum(wrong) / len(wrong) if wrong else None, "both_wrong_pairs": len(wrong)}
