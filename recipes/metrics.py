"""Reward-model metrics against human ranks (the paper's Table 4), in plain Python; their definitions are
recipes/README.md's "Metrics". Input: one (human ranks, judge scores) pair of lists per group; rank 0 is the
humans' best; a score is None when the judge's output was unparsable.
"""

import math
from bisect import bisect_left, bisect_right
from typing import Sequence


def _avg_ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    s = sorted(xs)
    return [(bisect_left(s, x) + bisect_right(s, x) + 1) / 2 for x in xs]


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson's r of the ranks) with average ranks for ties; None when either side is constant."""
    a, b = _avg_ranks(a), _avg_ranks(b)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb) if va and vb else None


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
        ij = [(i, j) for i in range(len(rk)) for j in range(i + 1, len(rk))]
        exact += all(_sign(sc[i] - sc[j]) == _sign(rk[j] - rk[i]) for i, j in ij)
        ordered = [(i, j) for i, j in ij if rk[i] != rk[j]]          # the pairs the humans order
        pairs += len(ordered)
        tied += sum(sc[i] == sc[j] for i, j in ordered)
        agree += sum(sc[i] != sc[j] and (sc[i] > sc[j]) == (rk[i] < rk[j]) for i, j in ordered)
        neg = [-r for r in rk]
        if len(set(rk)) == 1:
            human_tied += 1             # no human order to correlate with: not a 0, not counted
        else:
            rhos.append(spearman(sc, neg) or 0.0)
            taus.append(kendall_tau_b(sc, neg) or 0.0)
        n_perfect += sum(s == perfect for _, s in kept)
        perfect_best += sum(s == perfect and r == best for r, s in kept)
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


def paired_diff(a: Sequence, b: Sequence) -> tuple[float, float]:
    """Two models' per-item results on the same items (0/1 as bools, numbers or "0"/"1" characters): the mean
    of a - b and its paired standard error, sd(d_i) / sqrt(n)."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    return m, (sum((x - m) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5


def h2h_outcome(first: int | None, second: int | None) -> str:
    """A's fate from the two orders. `first`: the verdict with A shown first (1 = A, 2 = B); `second`: with
    B shown first (1 = B, 2 = A). A win needs both orders; a disagreement or no verdict is a tie."""
    return "win" if (first, second) == (1, 2) else "loss" if (first, second) == (2, 1) else "tie"
