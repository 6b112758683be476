"""The reward interface (recipes/reward.py): the RM source against transformers' sequence-classification
model on the same chat-rendered ids; the checker source against known right and wrong answers."""
from __future__ import annotations

import pytest
import torch

from tests.recipes_tiny import tiny_chat_model


def test_rm_reward_equals_transformers(tmp_path):
    import transformers
    from selfreward.model.reward_model import load_reward_model, save_reward_model
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.judge import chat_prompt_ids
    from selfreward.recipes.reward import load_reward
    d = tiny_chat_model(tmp_path / "m")
    tok = Tokenizer.load(d)
    m = load_reward_model(d, seed=1)
    with torch.no_grad():
        m.score.weight.mul_(30)
    save_reward_model(m, m.cfg, tmp_path / "rm", tok.pad_id, tokenizer_dir=d)
    prompts, replies = ["Name a fruit that is red.", "Tell me a joke about dogs."], ["An apple.", "No."]
    got = load_reward("rm", tmp_path / "rm")(prompts, replies)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    with torch.no_grad():
        want = [float(hf(torch.tensor([chat_prompt_ids(tok, p) + tok.render_response(r)])).logits[0, 0])
                for p, r in zip(prompts, replies)]
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(got[0] - got[1]) > 1e-3


def test_checker_reward():
    from selfreward.recipes.reward import load_reward
    r = load_reward("checker")
    assert r(["Which is largest: 7, 81, 30, 5, 62?", "Sort these digits: 5 1 4 1 0"], ["81", "0 1 4 1 5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not one of the world's tasks"):
        r(["Write a poem."], ["ok"])
    with pytest.raises(ValueError, match="choose one of"):
        load_reward("nope")
