"""The recipes' reward sources for online RL, (prompts, responses) -> rewards, by train/rl.py's REWARDS names
(`--reward`; any `module:function` factory plugs in too): `direct` and `judge` here, `rm` in
model/reward_model.py, `checker` in recipes/world/checker.py, `ifeval` in recipes/verifiable.py.

    reward = load_reward("direct", "runs/m1/model")       # a labeller's 1-10 score, in [-1, 1]
    rewards = reward(["What is 2 + 2?"], ["4"])           # -> [float]

Prompts are single user turns. Each source reads one distribution or score per response (deterministic); the
RM's score is unbounded, the others lie in [-1, 1].
"""

from pathlib import Path
from typing import Callable

import torch


def _check(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def _engine(path, device, dtype):
    from selfreward.infer.config import EngineConfig, load_engine
    return load_engine(str(path), EngineConfig(device=device, dtype=str(dtype).removeprefix("torch.")))


def direct(path: str | Path, template=None, device="cpu", dtype=torch.float32):
    """Direct RLAIF: recipes.rlaif.direct_scores with a labeller checkpoint (the prompt is the context).
    `template`: a recipes.rlaif.ScoreTemplate or a JSON file of one (None: the default)."""
    from selfreward.recipes.rlaif import ScoreTemplate, direct_scores, read_template
    engine = _engine(path, device, dtype)
    template = template if isinstance(template, ScoreTemplate) else read_template(ScoreTemplate, template)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        _check(prompts, responses)
        res = direct_scores(engine, engine.tokenizer, list(zip(prompts, responses)), template)
        return [r["reward"] for r in res["records"]]
    return score


def judge(path: str | Path, template: str | None = None, device="cpu", dtype=torch.float32):
    """The self-rewarding judge (recipes.judge): expected score over "0".."5" after the rubric (a file,
    built-in name or text), (E - 2.5) / 2.5."""
    from selfreward.recipes.judge import expected_scores, load_rubric, prompt_budget
    from selfreward.recipes.prompts import fit_prompt
    engine = _engine(path, device, dtype)
    rubric = template if template and "{instruction}" in template else load_rubric(template)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        _check(prompts, responses)
        budget = prompt_budget(engine, 8)
        ids = [fit_prompt(engine.tokenizer, rubric, {"instruction": p, "response": r}, budget)[0]
               for p, r in zip(prompts, responses)]
        return [(e - 2.5) / 2.5 for e, _ in expected_scores(engine, engine.tokenizer, ids)]
    return score


def load_reward(kind: str, path: str | Path | None = None, template=None, device: str | None = None,
                dtype: torch.dtype | None = None) -> Callable[[list[str], list[str]], list[float]]:
    """A reward function of `kind` (train/rl.py's REWARDS name, or module:function) from the checkpoint at `path`.
    `template`: "direct"'s ScoreTemplate (or JSON file), "judge"'s rubric. `device` / `dtype` None: the engine's
    default (infer.config.resolve_device)."""
    from selfreward.train.rl import reward_factory
    if device is None or dtype is None:
        from selfreward.infer.config import EngineConfig, resolve_device
        d, t = resolve_device(EngineConfig())
        device, dtype = device or d, dtype or t
    return reward_factory(kind)(path, template=template, device=device, dtype=dtype)
