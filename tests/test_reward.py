"""The reward interface (recipes/reward.py): the RM source against transformers' sequence-classification
model on the same chat-rendered ids; the checker source against known right and wrong answers."""
from __future__ import annotations

import pytest
import torch

from recipes_tiny import tiny_chat_model


def test_rm_reward_equals_transformers(tmp_path):
    import transformers
    from selfreward.model.reward_model import load_reward_model, save_reward_model
    from selfreward.model.tokenizer import Tokenizer
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
        want = [float(hf(torch.tensor([tok.user_ids(p) + tok.render_response(r)])).logits[0, 0])
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


def test_device_and_dtype_come_from_the_engine_config(tmp_path, monkeypatch):
    """load_reward's default is the engine's (CUDA + bf16 where there is one), not a fixed CPU; `evaluate
    reward --engine-dtype` reaches the reward model."""
    from selfreward.infer import config
    from selfreward.model.reward_model import load_reward_model, save_reward_model
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes import reward
    from selfreward.recipes.evaluate import main as evaluate
    d = tiny_chat_model(tmp_path / "m")
    m = load_reward_model(d, seed=1)
    save_reward_model(m, m.cfg, tmp_path / "rm", Tokenizer.load(d).pad_id, tokenizer_dir=d)
    real = config.resolve_device
    monkeypatch.setattr(config, "resolve_device", lambda cfg: ("cpu", torch.float16))   # as a GPU node's default
    assert next(reward.load_reward("rm", tmp_path / "rm").model.parameters()).dtype == torch.float16
    monkeypatch.setattr(config, "resolve_device", real)
    got, real_load = [], reward.load_reward
    monkeypatch.setattr(reward, "load_reward", lambda *a, **kw: got.append(kw) or real_load(*a, **kw))
    groups = tmp_path / "g.jsonl"
    groups.write_text('{"id": "g", "prompt": "Name a red fruit.", "replies": [{"text": "An apple.", "rank": 0}, '
                      '{"text": "Blue.", "rank": 1}]}\n')
    res = evaluate(["reward", "--kind", "rm", "--model", str(tmp_path / "rm"), "--groups", str(groups),
                    "--out", str(tmp_path / "r.json"), "--engine-device", "cpu", "--engine-dtype", "bfloat16"])
    assert got == [{"device": "cpu", "dtype": torch.bfloat16}]
    assert (res["settings"]["device"], res["settings"]["dtype"]) == ("cpu", "bfloat16")
