"""Reward-model metrics against human ranks (the paper's Table 4), in plain Python.

Input: one (human ranks, judge scores) pair of lists per group; rank 0 is the humans' best; a score is
None when the judge's output was unparsable. Unparsable replies are dropped from their group first (and
counted); a group left with fewer than 2 replies is skipped. Then, over the groups:

- pairwise accuracy: over every pair of replies with different human ranks, the share the judge orders the
  same way, strictly. A judge tie on such a pair counts as not agreeing (the share of tied pairs is reported).
- 5-best %: of the replies the judge scores a perfect 5 (a mean of exactly 5), the share the humans ranked
  best in their group (rank equal to the group's lowest rank). None when the judge gave no 5.
- exact match %: the share of groups where the judge's ordering equals the humans' ordering: for every pair,
  the sign of the score difference equals the sign of the rank difference (so a judge tie is only right
  where the humans tie).
- Spearman / Kendall tau: computed within each group between the judge scores and the negated human ranks
  (so agreement is positive), then averaged over groups. Ties get average ranks (Spearman) and tau-b
  (Kendall). A group whose human ranks are all equal has no defined correlation whatever the judge says: it
  is left out of both averages and counted (`corr_skipped_human_tied`). A group where the judge gives every
  reply the same score (the humans do not) contributes 0 (a judge that cannot tell replies apart earns nothing).
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from typing import Sequence


def _avg_ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    s = sorted(xs)
    return [(bisect_left(s, x) + bisect_right(s, x) + 1) / 2 for x in xs]


def _pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    return _pearson(_avg_ranks(a), _avg_ranks(b))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt(pairs untied in a * pairs untied in b); None if
    undefined."""
    signs = [(_sign(a[i] - a[j]), _sign(b[i] - b[j])) for i in range(len(a)) for j in range(i + 1, len(a))]
    den = math.sqrt(sum(x != 0 for x, _ in signs) * sum(y != 0 for _, y in signs))
    return None if den == 0 else sum(x * y for x, y in signs) / den


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def rm_metrics(groups: Sequence[tuple[Sequence[int], Sequence[float | None]]], perfect: float = 5.0) -> dict:
    """The five metrics (fractions in [0, 1], correlations in [-1, 1]) and the counts behind them."""
    pairs = agree = tied = exact = used = unparsable = n_perfect = perfect_best = human_tied = 0
    rhos: list[float] = []
    taus: list[float] = []
    for ranks, scores in groups:
        if len(ranks) != len(scores):
            raise ValueError(f"a group has {len(ranks)} ranks but {len(scores)} scores")
        unparsable += sum(s is None for s in scores)
        best = min(ranks)
        kept = [(r, s) for r, s in zip(ranks, scores) if s is not None]
        if len(kept) < 2:
            continue
        used += 1
        rk, sc = [r for r, _ in kept], [float(s) for _, s in kept]
        same = True
        for i in range(len(rk)):
            for j in range(i + 1, len(rk)):
                if _sign(sc[i] - sc[j]) != _sign(rk[j] - rk[i]):
                    same = False
                if rk[i] == rk[j]:
                    continue
                pairs += 1
                if sc[i] == sc[j]:
                    tied += 1
                elif (sc[i] > sc[j]) == (rk[i] < rk[j]):
                    agree += 1
        exact += same
        neg = [-r for r in rk]
        if len(set(rk)) == 1:
            human_tied += 1             # no human order to correlate with: not a 0, not counted
        else:
            rhos.append(spearman(sc, neg) or 0.0)
            taus.append(kendall_tau_b(sc, neg) or 0.0)
        for r, s in kept:
            if s == perfect:
                n_perfect += 1
                perfect_best += r == best
    return {
        "pairwise_accuracy": agree / pairs if pairs else None,
        "five_best": perfect_best / n_perfect if n_perfect else None,
        "exact_match": exact / used if used else None,
        "spearman": sum(rhos) / len(rhos) if rhos else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "groups": len(groups), "groups_used": used, "pairs": pairs, "pairs_judge_tied": tied,
        "unparsable_replies": unparsable, "perfect_scores": n_perfect,
        "corr_groups": len(rhos), "corr_skipped_human_tied": human_tied,
    }


def h2h_outcome(first: int | None, second: int | None) -> str:
    """A's fate from the two orders. `first`: the verdict with A shown first (1 = A, 2 = B); `second`: with
    B shown first (1 = B, 2 = A). A win needs both orders; a disagreement or no verdict is a tie."""
    a1 = {1: "A", 2: "B"}.get(first)
    a2 = {1: "B", 2: "A"}.get(second)
    if a1 == a2 == "A":
        return "win"
    if a1 == a2 == "B":
        return "loss"
    return "tie"
