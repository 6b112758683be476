"""Reward-model metrics against hand-computed values (ties and unparsable replies included); h2h outcome."""
import json
import math

import pytest

from selfreward.recipes.h2h import parse_choice
from selfreward.recipes.metrics import h2h_outcome, kendall_tau_b, rm_metrics, spearman
from selfreward.recipes.prompts import fill

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

    from conftest import ROOT
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
    assert fill("{instruction}|{response_1}|{response_2}|{x}", instruction="q", response_1="{response_2}",
                response_2="b") == "q|{response_2}|b|{x}"


def test_head_to_head_scripted_judge_win_then_swapped_loss():
    """Issue 13 item 11: a judge that prefers the marked reply. A marked: a win on every prompt (both orders
    agree); A and B swapped: a loss on every prompt; a judge with no preference (no mark): position bias, a tie."""
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.h2h import H2HConfig, head_to_head
    from conftest import TOKENIZER_DIR
    from scripted import MARK, ScriptedEngine, pairwise_judge
    tok = Tokenizer.load(TOKENIZER_DIR)
    judge = ScriptedEngine(tok, pairwise_judge())
    prompts = ["Name a red fruit.", "Say hi to the cat."]
    good = [f"An apple. {MARK}", f"Hi, cat! {MARK}"]
    plain = ["A blue stone.", "Bye."]
    res = head_to_head(judge, tok, prompts, good, plain, H2HConfig(max_tokens=16))
    assert (res["win"], res["tie"], res["loss"], res["n"], res["no_verdict"]) == (1.0, 0.0, 0.0, 2, 0)
    assert [(r["a_first"], r["b_first"]) for r in res["records"]] == [(1, 2), (1, 2)]
    texts, _, _ = judge.calls[0]
    assert len(texts) == 4 and all(MARK in t.split("Reply 2:")[0] for t in texts[:2])    # A shown first
    assert all(MARK in t.split("Reply 2:")[1] for t in texts[2:])                          # then B first
    res = head_to_head(judge, tok, prompts, plain, good, H2HConfig(max_tokens=16))
    assert (res["win"], res["tie"], res["loss"]) == (0.0, 0.0, 1.0)
    res = head_to_head(judge, tok, prompts, plain, ["Hello.", "Yo."], H2HConfig(max_tokens=16))
    assert (res["win"], res["tie"], res["loss"]) == (0.0, 1.0, 0.0)     # always "1": both orders disagree


# Item 12: the `rm` command with a scripted judge: known judgments, metrics worked out by hand.
# reply -> (K = 2 sampled judgments, expected-score digit probabilities P(0..5))
RM_SCRIPT = {"An apple.": (["Score: 5", "Score: 4"], [0, 0, 0, 0, 0.5, 0.5]),     # mean 4.5, expected 4.5
             "Blue.": (["Score: 2", "Score: N/A"], [0, 1, 0, 0, 0, 0]),           # mean 2 (one unparsable), 1
             "A stone.": (["Score: 2", "Score: 2"], [0, 0, 1, 0, 0, 0]),          # 2, 2
             "Hi!": (["Score: 3", "Score: 3"], [0, 0, 0, 1, 0, 0]),               # 3, 3
             "Hello!": (["Score: 4", "Score: 5"], [0, 0, 1, 0, 0, 0]),            # 4.5, 2
             "Yes.": (["Score: 1", "Score: 1"], [0.5, 0.5, 0, 0, 0, 0]),          # 1, 0.5
             "Sure.": (["Score: 5", "Score: 5"], [0, 0, 0, 0, 0, 1])}             # 5, 5
RM_GROUPS = [{"id": "g1", "prompt": "Name a red fruit.", "replies": [{"text": "An apple.", "rank": 0},
                                                                     {"text": "Blue.", "rank": 1},
                                                                     {"text": "A stone.", "rank": 2}]},
             {"id": "g2", "prompt": "Greet me.", "replies": [{"text": "Hi!", "rank": 1}, {"text": "Hello!", "rank": 0}]},
             {"id": "g3", "prompt": "Can you help?", "replies": [{"text": "Yes.", "rank": 0}, {"text": "Sure.", "rank": 0}]}]


def _which(text: str) -> str:
    body = text.split("Reply:", 1)[1]                    # the short template: "Reply: {response}"
    found = [r for r in RM_SCRIPT if r in body]
    assert len(found) == 1, (found, text)
    return found[0]


def test_rm_command_scripted_judge_hand_computed(tmp_path, monkeypatch):
    from selfreward.infer import config
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.evaluate import main as evaluate
    from conftest import TOKENIZER_DIR
    from scripted import ScriptedEngine
    fake = ScriptedEngine(Tokenizer.load(TOKENIZER_DIR), lambda text, seed, j: RM_SCRIPT[_which(text)][0][j],
                          probs=lambda text: RM_SCRIPT[_which(text)][1])
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None: fake)
    gf = tmp_path / "groups.jsonl"
    gf.write_text("".join(json.dumps(g) + "\n" for g in RM_GROUPS))
    res = evaluate(["rm", "--judge", str(TOKENIZER_DIR), "--groups", str(gf), "--k", "2", "--max-tokens", "8",
                    "--judge-template", "short", "--expected", "--out", str(tmp_path / "rm.json")])
    assert json.loads((tmp_path / "rm.json").read_text())["sampled"] == res["sampled"]
    assert [r["mean"] for r in res["records"]] == [4.5, 2, 2, 3, 4.5, 1, 5]
    assert res["records"][0]["expected"] == pytest.approx(4.5)
    assert (res["judgments"], res["parse_failures"], res["prompts_cut"]) == (14, 1, 0)
    s, e = res["sampled"], res["expected"]
    # sampled. g1 [4.5, 2, 2] on ranks [0, 1, 2]: (0,1) and (0,2) agree, (1,2) a judge tie; g2 [3, 4.5] on ranks
    # [1, 0]: agrees; g3 (humans tie) has no pair -> 3 of 4, 1 tied. Exact: only g2. 5-best: "Sure." (g3, rank 0).
    # Spearman g1: score ranks [3, 1.5, 1.5] vs [3, 2, 1]: 1.5 / sqrt(1.5 * 2); g2 1; g3 skipped (humans tie)
    # Kendall g1: 2 concordant, 1 score tie: 2 / sqrt((3 - 1) * 3); g2 1.
    assert (s["pairs"], s["pairs_judge_tied"], s["groups_used"], s["unparsable_replies"]) == (4, 1, 3, 0)   # "Blue." keeps 1
    assert s["pairwise_accuracy"] == pytest.approx(0.75) and s["exact_match"] == pytest.approx(1 / 3)
    assert s["five_best"] == pytest.approx(1.0) and s["perfect_scores"] == 1
    assert s["spearman"] == pytest.approx((1.5 / math.sqrt(3) + 1) / 2)
    assert s["kendall_tau"] == pytest.approx((2 / math.sqrt(6) + 1) / 2)
    assert s["corr_skipped_human_tied"] == 1
    # expected. g1 [4.5, 1, 2]: (0,1), (0,2) agree, (1,2) not; g2 [3, 2] on ranks [1, 0]: not -> 2 of 4; no exact
    # match; "Sure." 5.0 -> 5-best 1. Spearman g1 ranks [3, 1, 2] vs [3, 2, 1]: 0.5, g2 -1; Kendall g1 1/3, g2 -1.
    assert e["pairwise_accuracy"] == pytest.approx(0.5) and e["exact_match"] == 0 and e["pairs_judge_tied"] == 0
    assert e["five_best"] == pytest.approx(1.0)
    assert e["spearman"] == pytest.approx(-0.25) and e["kendall_tau"] == pytest.approx(-1 / 3)


def test_rm_command_resumes_refuses_a_mismatch_and_locks(tmp_path, monkeypatch):
    """`evaluate rm` keeps its judgments in OUT.judgments.jsonl (the output rules of docs/guarantees.md): a
    run whose append failed resumes with only the replies not yet judged and ends at the uninterrupted
    result; another setting is refused without --overwrite; a second writer is refused."""
    from selfreward import records
    from selfreward.infer import config
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.provenance import output_lock
    from selfreward.recipes.evaluate import main as evaluate
    from selfreward.records import DataError
    from conftest import TOKENIZER_DIR
    from guarantee_fixtures import disk_full_at
    from scripted import ScriptedEngine
    fake = ScriptedEngine(Tokenizer.load(TOKENIZER_DIR), lambda text, seed, j: RM_SCRIPT[_which(text)][0][j],
                          probs=lambda text: RM_SCRIPT[_which(text)][1])
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None: fake)
    gf = tmp_path / "groups.jsonl"
    gf.write_text("".join(json.dumps(g) + "\n" for g in RM_GROUPS))
    out = tmp_path / "rm.json"
    args = ["rm", "--judge", str(TOKENIZER_DIR), "--groups", str(gf), "--k", "2", "--max-tokens", "8",
            "--judge-template", "short", "--expected", "--chunk", "2", "--out", str(out)]
    with disk_full_at(monkeypatch, 4), pytest.raises(OSError):   # one append per reply: chunk 2's second
        evaluate(args)
    store = tmp_path / "rm.json.judgments.jsonl"
    assert not out.exists() and len(records.read_partial(store)) == 3
    fake.calls.clear()
    res = evaluate(args)
    assert sum(len(texts) for texts, _, _ in fake.calls) == 4     # the 4 replies left, nothing judged twice
    assert [r["mean"] for r in res["records"]] == [4.5, 2, 2, 3, 4.5, 1, 5]     # the hand-worked result above
    assert res["sampled"]["pairwise_accuracy"] == pytest.approx(0.75)
    before = (store.read_bytes(), out.read_bytes())
    with pytest.raises(DataError, match=r"seed: 0 -> 1"):
        evaluate(args + ["--seed", "1"])
    assert (store.read_bytes(), out.read_bytes()) == before
    with output_lock(store):
        with pytest.raises(DataError, match="another run"):
            evaluate(args)
    assert (store.read_bytes(), out.read_bytes()) == before
    assert evaluate(args + ["--seed", "1", "--overwrite"])["settings"]["seed"] == 1


def test_reward_command_refuses_a_mismatched_rerun(tmp_path):
    from selfreward.recipes.evaluate import main as evaluate
    from selfreward.records import DataError
    from recipes_tiny import tiny_chat_model
    m = tiny_chat_model(tmp_path / "m")
    gf = tmp_path / "groups.jsonl"
    gf.write_text("".join(json.dumps(g) + "\n" for g in RM_GROUPS))
    out = tmp_path / "r.json"
    args = ["reward", "--kind", "direct", "--model", str(m), "--groups", str(gf), "--out", str(out)]
    first = evaluate(args)
    assert evaluate(args)["metrics"] == first["metrics"]             # the same settings: rerun, same result
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"limit: null -> 2"):
        evaluate(args + ["--limit", "2"])
    assert out.read_bytes() == before
    assert evaluate(args + ["--limit", "2", "--overwrite"])["metrics"]["groups"] == 2


def test_h2h_command_resumes_and_refuses_a_mismatch(tmp_path, monkeypatch):
    """`evaluate h2h` keeps A's replies, B's replies and the verdicts in OUT.h2h/ (resumable, recorded in
    OUT.h2h/run.json): a run whose append failed resumes with only what is missing and gives the scripted
    judge's result; another setting is refused without --overwrite."""
    import shutil
    from selfreward.infer import config
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.evaluate import main as evaluate
    from selfreward.records import DataError
    from conftest import TOKENIZER_DIR
    from guarantee_fixtures import disk_full_at
    from scripted import MARK, ScriptedEngine, pairwise_judge
    from pathlib import Path
    from selfreward.records import read_partial
    tok = Tokenizer.load(TOKENIZER_DIR)
    dirs = {name: shutil.copytree(TOKENIZER_DIR, tmp_path / name) for name in ("good", "plain", "judge")}
    fakes = {"good": ScriptedEngine(tok, lambda text, seed, j: f"An apple. {MARK}"),
             "plain": ScriptedEngine(tok, lambda text, seed, j: "A blue stone."),
             "judge": ScriptedEngine(tok, pairwise_judge())}
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None: fakes[Path(path).name])
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a red fruit.", "Say hi.", "Count.")))
    out = tmp_path / "h2h.json"
    args = ["h2h", "--a", str(dirs["good"]), "--b", str(dirs["plain"]), "--judge", str(dirs["judge"]), "--prompts",
            str(pf), "--max-tokens", "16", "--chunk", "1", "--out", str(out)]
    with disk_full_at(monkeypatch, 3), pytest.raises(OSError):     # A's third reply cannot be written
        evaluate(args)
    work = tmp_path / "h2h.json.h2h"
    assert not out.exists() and len(read_partial(work / "replies_a.jsonl")) == 2
    for f in fakes.values():
        f.calls.clear()
    res = evaluate(args)
    assert [len(t) for t, _, _ in fakes["good"].calls] == [1]                 # only the missing reply
    assert sum(len(t) for t, _, _ in fakes["plain"].calls) == 3
    assert sum(len(t) for t, _, _ in fakes["judge"].calls) == 6              # both orders of 3 prompts
    assert (res["win"], res["tie"], res["loss"], res["n"], res["no_verdict"]) == (1.0, 0.0, 0.0, 3, 0)
    assert json.loads(out.read_text())["win"] == 1.0
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"seed: 0 -> 1"):
        evaluate(args + ["--seed", "1"])
    assert out.read_bytes() == before and (work / "verdicts.jsonl").exists()
    assert evaluate(args + ["--seed", "1", "--overwrite"])["settings"]["a"] == str(dirs["good"])
