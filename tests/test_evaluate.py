"""Reward-model metrics against hand-computed values (ties and unparsable replies included); h2h outcome."""
import math

import pytest

from selfreward.recipes.evaluate import pair_prompt, parse_choice
from selfreward.recipes.metrics import h2h_outcome, kendall_tau_b, rm_metrics, spearman

# G1 perfect; G2 reversed; G3 a judge tie on the top two; G4 one unparsable and a tie of two 5s;
# G5 one unparsable out of two -> skipped.
GROUPS = [([0, 1, 2], [5, 3, 1]), ([0, 1], [2, 4]), ([0, 1, 2], [4, 4, 1]), ([0, 1, 2], [None, 5, 5]),
          ([0, 1], [None, 3])]


def test_rm_metrics_hand_computed():
    m = rm_metrics(GROUPS)
    # pairs with different human ranks: G1 3 (3 agree), G2 1 (0), G3 3 (2 agree, 1 tied), G4 1 (tied) -> 5/8
    assert m["pairs"] == 8 and m["pairs_judge_tied"] == 2
    assert m["pairwise_accuracy"] == pytest.approx(5 / 8)
    assert m["exact_match"] == pytest.approx(1 / 4)          # only G1, of 4 used groups
    # G3 Spearman: avg ranks of scores [2.5, 2.5, 1] vs ranks of -rank [3, 2, 1] -> 1.5 / sqrt(1.5 * 2)
    rho3 = 1.5 / math.sqrt(3)
    # G3 tau-b: concordant 2, discordant 0, one tie in scores: 2 / sqrt((3 - 1) * 3)
    tau3 = 2 / math.sqrt(6)
    assert m["spearman"] == pytest.approx((1 - 1 + rho3 + 0) / 4)   # G4 constant judge -> 0
    assert m["kendall_tau"] == pytest.approx((1 - 1 + tau3 + 0) / 4)
    # perfect 5s: G1 rank 0 (best), G4 ranks 1 and 2 (group best is rank 0) -> 1/3
    assert m["perfect_scores"] == 3 and m["five_best"] == pytest.approx(1 / 3)
    assert m["groups"] == 5 and m["groups_used"] == 4 and m["unparsable_replies"] == 2


def test_correlations_skip_groups_humans_tied():
    """Issue 13 item 9: a group whose human ranks are all equal has no correlation: skipped, counted, not a 0."""
    tied_humans = ([1, 1, 1], [5, 2, 1])
    m = rm_metrics(GROUPS + [tied_humans])
    rho3, tau3 = 1.5 / math.sqrt(3), 2 / math.sqrt(6)      # as in test_rm_metrics_hand_computed
    assert m["spearman"] == pytest.approx((1 - 1 + rho3 + 0) / 4)     # still over G1-G4, not / 5
    assert m["kendall_tau"] == pytest.approx((1 - 1 + tau3 + 0) / 4)
    assert m["corr_skipped_human_tied"] == 1 and m["corr_groups"] == 4 and m["groups_used"] == 5
    assert m["pairs"] == 8                                  # no pair with different human ranks added
    only = rm_metrics([tied_humans, ([0, 0], [3, 3])])
    assert only["spearman"] is None and only["kendall_tau"] is None and only["corr_skipped_human_tied"] == 2


def test_rm_metrics_empty_and_errors():
    m = rm_metrics([([0, 1], [None, None])])
    assert m["pairwise_accuracy"] is None and m["five_best"] is None and m["spearman"] is None
    with pytest.raises(ValueError):
        rm_metrics([([0, 1], [1.0])])


def test_scipy_in_the_test_extra():
    """Issue 13 item 10: the independent check below must run in CI, so the test extra installs scipy."""
    import re

    from tests.conftest import ROOT
    dev = re.search(r"^dev = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    assert re.search(r'"scipy\s*(>=[^"]*)?"', dev), dev      # (tomllib would need Python 3.11)


def test_correlations_against_scipy():
    from scipy import stats      # in the `dev` extra: a missing scipy fails here rather than skipping
    cases = [([3, 1, 2, 2, 5], [1, 2, 3, 4, 5]), ([1, 1, 2, 3], [4, 3, 3, 1]), ([0.5, 2, 2, 2], [1, 2, 3, 3])]
    for a, b in cases:
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
        assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)
    assert spearman([1, 1], [1, 2]) is None and kendall_tau_b([1, 1], [1, 2]) is None


def test_head_to_head_both_orders():
    # first: A shown as reply 1; second: B shown as reply 1
    assert h2h_outcome(1, 2) == "win"
    assert h2h_outcome(2, 1) == "loss"
    assert h2h_outcome(1, 1) == "tie"      # position bias: both orders prefer reply 1
    assert h2h_outcome(2, 2) == "tie"
    assert h2h_outcome(None, 2) == "tie"
    assert parse_choice("Reply 1 is better.\nBetter: 2") == 2
    assert parse_choice("Better: **1**") == 1
    assert parse_choice("Better: 3") is None and parse_choice("Better: 12") is None
    assert parse_choice("Better: 1 ... Better: Reply 2") == 2
    assert pair_prompt("{instruction}|{response_1}|{response_2}|{x}", "q", "{response_2}", "b") == "q|{response_2}|b|{x}"
