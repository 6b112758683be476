"""One reward interface for online RL and the self-rewarding loop: (prompts, responses) -> rewards.

    reward = load_reward("rm", "runs/rm/model")           # the distilled reward model (train/rm.py)
    reward = load_reward("direct", "runs/m1/model")       # direct RLAIF: a labeller's 1-10 score, in [-1, 1]
    reward = load_reward("judge", "runs/m1/model")        # the self-rewarding judge's expected 0-5 score, in [-1, 1]
    reward = load_reward("checker")                       # the checkable world's checker: 1 right, 0 wrong
    rewards = reward(["What is 2 + 2?"], ["4"])           # -> [float]

Prompts are single user turns (rendered with the checkpoint's chat template); responses are reply texts.
Every source reads one token distribution or one score per response: no sampling, so rewards are
deterministic. The raw RM score is unbounded (only differences are trained); the others are rescaled so
that -1 is the worst and +1 the best grade.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

KINDS = ("rm", "direct", "judge", "checker")


class Reward(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def _check(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


class RMReward:
    """The distilled reward model: score at the last non-pad token of chat(prompt) + reply."""

    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32, batch: int = 32, model=None, tok=None):
        from selfreward.model.reward_model import load_reward_model, read_pad_id
        from selfreward.model.tokenizer import Tokenizer
        self.model = (model or load_reward_model(path, dtype=dtype, device=device)).eval()
        self.tok = tok or Tokenizer.load(path)
        self.pad_id = read_pad_id(path) if model is None else self.tok.pad_id
        self.batch = batch
        self.max_len = self.model.cfg.max_position_embeddings

    def ids(self, prompt: str, response: str) -> list[int]:
        from selfreward.recipes.prompts import chat_prompt_ids
        p, r = chat_prompt_ids(self.tok, prompt), self.tok.render_response(response)
        r = r[:self.max_len // 2] if len(p) + len(r) > self.max_len and len(r) > self.max_len // 2 else r
        room = self.max_len - len(r)          # a long prompt keeps BOS and its last tokens (as train/rm.py)
        return (p if len(p) <= room else p[:1] + p[len(p) - room + 1:]) + r

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfreward.model.reward_model import packed_rewards
        _check(prompts, responses)
        seqs = [self.ids(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for s in range(0, len(seqs), self.batch):
            out += packed_rewards(self.model, seqs[s:s + self.batch], self.pad_id).tolist()
        return out


class DirectReward:
    """Direct RLAIF: recipes.rlaif.direct_scores with a labeller checkpoint (the prompt is the context)."""

    def __init__(self, engine, tok, template=None):
        self.engine, self.tok, self.template = engine, tok, template

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfreward.recipes.rlaif import direct_scores
        _check(prompts, responses)
        res = direct_scores(self.engine, self.tok, list(zip(prompts, responses)), self.template)
        return [r["reward"] for r in res["records"]]


class JudgeReward:
    """The self-rewarding judge (recipes.judge): expected score over "0".."5" after the rubric, (E - 2.5) / 2.5."""

    def __init__(self, engine, tok, template: str | None = None, max_tokens: int = 256):
        from selfreward.recipes.judge import load_rubric
        self.engine, self.tok, self.max_tokens = engine, tok, max_tokens
        self.template = template if template and "{instruction}" in template else load_rubric(template)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfreward.recipes.judge import expected_scores, prompt_budget
        from selfreward.recipes.prompts import fit_prompt
        _check(prompts, responses)
        budget = prompt_budget(self.engine, 8)
        ids = [fit_prompt(self.tok, self.template, {"instruction": p, "response": r}, budget)[0]
               for p, r in zip(prompts, responses)]
        return [(e - 2.5) / 2.5 for e, _ in expected_scores(self.engine, self.tok, ids)]


class CheckerReward:
    """The checkable world's checker: 1.0 right, 0.0 wrong; a prompt that is no world task is an error."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        from selfreward.recipes.world.checker import check
        _check(prompts, responses)
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            v = check(p, r)
            if v is None:
                raise ValueError(f"prompt {i} is not one of the world's tasks: {p[:60]!r}")
            out.append(float(v))
        return out


def load_reward(kind: str, path: str | Path | None = None, template=None, device: str | None = None,
                dtype: torch.dtype | None = None) -> Callable[[list[str], list[str]], list[float]]:
    """A reward function of `kind` (one of KINDS) from the checkpoint at `path` (none for the checker).
    `template`: for "direct" a recipes.rlaif.ScoreTemplate (or a JSON file), for "judge" a rubric (file,
    built-in name or text). `device` / `dtype` None: the engine's default (infer.config.resolve_device:
    CUDA + bf16 where there is one, else CPU fp32)."""
    if device is None or dtype is None:
        from selfreward.infer.config import EngineConfig, resolve_device
        d, t = resolve_device(EngineConfig())
        device, dtype = device or d, dtype or t
    if kind not in KINDS:
        raise ValueError(f"reward kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "checker":
        return CheckerReward()
    if path is None:
        raise ValueError(f"reward kind {kind!r} needs a checkpoint folder")
    if kind == "rm":
        return RMReward(path, device=device, dtype=dtype)
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.model.tokenizer import Tokenizer
    ecfg = EngineConfig(device=device, dtype=str(dtype).removeprefix("torch."))
    engine, tok = load_engine(str(path), ecfg), Tokenizer.load(path)
    if kind == "direct":
        from selfreward.recipes.rlaif import ScoreTemplate, read_template
        t = template if isinstance(template, ScoreTemplate) else read_template(ScoreTemplate, template)
        return DirectReward(engine, tok, t)
    return JudgeReward(engine, tok, template)
