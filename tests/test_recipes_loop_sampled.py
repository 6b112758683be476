"""Issue 13 item 14: a whole M1 -> M3 run whose pairs come from SAMPLED, PARSED judgments through the real
stages (prompts file, candidates, judge with the score parser, pairs, DPO through train/dpo.py on a real tiny
model). The engine is scripted: each candidate states a quality level, the judge writes `Score:` lines from
it (one of them unparsable), so the pairs the loop must build are known by hand."""
import re

import pytest
from safetensors.torch import load_file

from selfreward.records import read_jsonl
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import run_loop
from recipes_tiny import loop_config, tiny_chat_model, write_prompts
from scripted import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Tell me about cats.", "How do I boil an egg?", "Give all the same answers please.", "Why is the sea salty?"]


def _loop_config(tmp_path, m1, prompts_file):
    """The loop's settings in one place (the only part of this test that knows LoopConfig's layout)."""
    return loop_config(run_dir=str(tmp_path / "run"), init_model=str(m1), iterations=2,
                       prompt_source=str(prompts_file), n_prompts=4, n_candidates=3, max_tokens=16,
                       judge_k=2, judge_max_tokens=16, judge_template="short", score_from="sampled", chunk=2,
                       dpo=dict(max_steps=1, batch_size=2, max_length=128, lr=1e-3, warmup_steps=0, dropout=0.0))


def level_of_candidate(text: str, seed: int, j: int) -> int:
    return 3 if "same" in text else (seed + j) % 6


def judgment(level: int, k: int) -> str:
    """Judgment k of a reply at `level`: k = 0 says the level; k = 1 one more (at most 5), except that at
    level 2 it gives no number (unparsable, so that reply's mean is its one parsable score)."""
    if k == 0:
        return f"On topic and clear.\nScore: {level}"
    return "I cannot tell.\nScore: N/A" if level == 2 else f"Mostly good.\nScore: {min(5, level + 1)}"


def mean_by_hand(level: int) -> float:
    return float(level) if level == 2 else (level + min(5, level + 1)) / 2


def scripted(text: str, seed: int, j: int) -> str:
    if "Score: <points>" in text:                                 # the short judge template
        level = int(re.search(r"Reply: Answer \d+ at level (\d)\.", text).group(1))
        return judgment(level, j)
    return f"Answer {j} at level {level_of_candidate(text, seed, j)}."


def test_loop_pairs_from_sampled_parsed_judgments(tmp_path, monkeypatch):
    from selfreward.infer import config
    from selfreward.model.tokenizer import Tokenizer
    m1 = tiny_chat_model(tmp_path / "m1")
    tok = Tokenizer.load(m1)
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None: ScriptedEngine(tok, scripted, max_len=512))
    cfg = _loop_config(tmp_path, m1, write_prompts(tmp_path / "prompts.jsonl", PROMPTS))
    ms = run_loop(cfg)
    assert len(ms) == 2
    for t, m in enumerate(ms, 1):
        it = folder(cfg, t)
        cands = read_jsonl(it / "candidates.jsonl")
        judg = read_jsonl(it / "judgments.jsonl")
        assert len(cands) == 12 and len(judg) == 24
        level = {(c["id"], c["sample"]): int(re.search(r"level (\d)", c["text"]).group(1)) for c in cands}
        # the parser read what the judge wrote: the scores are the numbers of the script, N/A -> None
        for j in judg:
            lv = level[(j["id"], j["sample"])]
            want = None if (lv == 2 and j["k"] == 1) else (lv if j["k"] == 0 else min(5, lv + 1))
            assert j["score"] == want and j["judgment"] == judgment(lv, j["k"])
        # the pairs by hand: per prompt the highest against the lowest mean (the first sample among equals)
        want_pairs = []
        for pid in [f"p{i}" for i in range(4)]:
            scored = [(mean_by_hand(level[(pid, s)]), s) for s in range(3)]
            hi = max(scored, key=lambda x: x[0])
            lo = min(scored, key=lambda x: x[0])
            if hi[0] != lo[0]:
                want_pairs.append((pid, hi[1], lo[1], hi[0], lo[0]))
        pairs = read_jsonl(it / "pairs.jsonl")
        assert [(p["id"], p["chosen_sample"], p["rejected_sample"], p["chosen_score"], p["rejected_score"])
                for p in pairs] == want_pairs
        assert len(want_pairs) == 3 and "p2" not in {p["id"] for p in pairs}        # all-same prompt: a tie
        text = {(c["id"], c["sample"]): c["text"] for c in cands}
        assert all(p["chosen"] == text[(p["id"], p["chosen_sample"])] for p in pairs)
        c = m["counts"]
        assert (c["pairs"], c["ties"], c["judgments"]) == (3, 1, 24)
        assert c["parse_failures"] == sum(lv == 2 for lv in level.values())
        assert (it / "model" / "config.json").exists()
    # DPO trained on those pairs: each iteration's model differs from the one it started from
    w = [load_file(str(p / "model.safetensors")) for p in (m1, folder(cfg, 1) / "model", folder(cfg, 2) / "model")]
    for a, b in zip(w, w[1:]):
        assert any((a[k] != b[k]).any() for k in a)
