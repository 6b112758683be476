"""Judge self-training (recipes.self_reward --judge-self-train): the records it takes from an iteration's own
judgments, checked against a hand-built iteration folder."""
from __future__ import annotations

import pytest

from selfreward.cli import ConfigError
from selfreward.recipes.judge import JudgeConfig
from selfreward.recipes.loop_config import LoopConfig
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import write_judge_self
from selfreward.records import read_jsonl, write_jsonl
from selfreward.train.dpo import DPOConfig


def _iteration(tmp_path, n: int) -> LoopConfig:
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("J [{instruction}] <{response}>")
    cfg = LoopConfig(run_dir=str(tmp_path / "run"), judge_self_train=n, dpo=DPOConfig(nll_alpha=1.0),
                     judge=JudgeConfig(k=2, template=str(tpl)))
    it = folder(cfg, 1)
    it.mkdir(parents=True)
    # prompt p: texts a (samples 0 and 3: one text), b, c, d; q: x, y
    texts = {"p": ["a", "b", "c", "a", "d"], "q": ["x", "y"]}
    write_jsonl(it / "candidates.jsonl", [{"id": i, "sample": s, "text": t}
                                          for i, ts in texts.items() for s, t in enumerate(ts)])
    # (id, sample) -> the two judgments' (text, score, prompt_cut); distinct judging: a is judged once (sample 0)
    J = {("p", 0): [("ja", 5, False), ("ja2", 5, False)],      # unanimous: counts (its first judgment)
         ("p", 1): [("jb", 1, False), ("jb2", 5, False)],      # split: left out
         ("p", 2): [("jc", 1, False), ("jc", 1, False)],       # unanimous
         ("p", 4): [("jd", 1, True), ("jd", 1, True)],         # prompt cut: left out
         ("q", 0): [("jx", 1, False), ("jx", 1, False)],
         ("q", 1): [("jy", 5, False), ("jy", 5, False)]}
    write_jsonl(it / "judgments.jsonl", [{"id": i, "sample": s, "k": k, "judgment": x, "score": sc, "prompt_cut": cut}
                                         for (i, s), js in J.items() for k, (x, sc, cut) in enumerate(js)])
    pairs = [("p", "a", "b"), ("p", "a", "c"), ("p", "a", "d"), ("q", "y", "x")]
    write_jsonl(it / "pairs.jsonl", [{"id": i, "prompt": i.upper() + "?", "chosen": c, "rejected": r}
                                     for i, c, r in pairs])
    return cfg


def test_judge_self_train_takes_unanimous_uncut_judgments_of_paired_texts(tmp_path):
    cfg = _iteration(tmp_path, 10)
    recs = read_jsonl(write_judge_self(cfg, 1))
    got = sorted((r["prompt"], r["chosen"]) for r in recs)
    # a once (chosen in three pairs), y; rejected: c, x (b split, d cut)
    assert got == [("J [P?] <a>", "ja"), ("J [P?] <c>", "jc"), ("J [Q?] <x>", "jx"), ("J [Q?] <y>", "jy")]
    assert all(r["chosen"] == r["rejected"] and r["sft_only"] for r in recs)


def test_judge_self_train_caps_each_side_at_half(tmp_path):
    cfg = _iteration(tmp_path, 3)              # at most 1 chosen text and 2 rejected ones
    recs = read_jsonl(write_judge_self(cfg, 1))
    chosen = [r for r in recs if r["chosen"] in ("ja", "jy")]
    assert len(recs) == 3 and len(chosen) == 1
    again = read_jsonl(write_judge_self(cfg, 1))   # an existing file is kept (resume)
    assert again == recs


def test_judge_self_train_config_checks():
    with pytest.raises(ConfigError, match="nll-alpha"):
        LoopConfig(judge_self_train=100, dpo=DPOConfig(nll_alpha=0.0))
    with pytest.raises(ConfigError, match="judge-self-train"):
        LoopConfig(judge_self_train=-1, dpo=DPOConfig(nll_alpha=1.0))
