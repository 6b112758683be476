"""Scripted stand-ins for a model behind `infer.engine.Engine`: they read the prompt (decoded with the real
tokenizer) and answer by a rule the test states, so a test can compute by hand what the code under test
must make of the answers. They implement what the recipes call: `max_len`, `generate`, `next_token_logprobs`."""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from selfreward.infer.engine import Engine
from selfreward.infer.sequence import Completion

MARK = "[GOOD]"          # a reply carrying this is the one a scripted pairwise judge prefers


class ScriptedEngine:
    """reply(prompt_text, seed, j) -> the text of sample j; probs(prompt_text) -> 6 digit probabilities (for
    the expected score). `seed` is the request's SamplingParams seed, as the real engine's sample j uses
    seed + j. Every call is recorded in `calls` as (prompt texts, seeds, n)."""

    def __init__(self, tok, reply: Callable[[str, int, int], str], probs: Callable[[str], list[float]] | None = None,
                 max_len: int = 512):
        self.tok, self.reply, self.probs, self.max_len = tok, reply, probs, max_len
        self.tokenizer = tok                     # as Engine.tokenizer: the session hands it out
        self.eos = {tok.eos_id} if getattr(tok, "eos_id", None) is not None else set()
        self.calls: list[tuple[list[str], list[int | None], int]] = []
        self.stats = {"prefill_computed": 0, "prefix_hit": 0, "generated": 0, "preempted": 0}   # Engine.stats

    def generate(self, prompts, params=None, n: int = 1, progress: bool = False, on_request=None):
        ps = params if isinstance(params, list) else [params] * len(prompts)
        texts = [self.tok.decode(p) for p in prompts]
        self.calls.append((texts, [getattr(p, "seed", None) for p in ps], n))
        out = []
        for text, p in zip(texts, ps):
            seed = getattr(p, "seed", None) or 0
            comps = []
            for j in range(n):
                t = self.reply(text, seed, j)
                ids = self.tok.encode(t) + sorted(self.eos)[:1]      # as sampled: the text, then the stop token
                comps.append(Completion(token_ids=ids, text=t, logprobs=None, finish_reason="stop"))
            out.append(comps)
            if on_request is not None:             # as the engine: each request's samples once finished
                on_request(len(out) - 1, comps)
        return out

    reply_ids = Engine.reply_ids             # the real engine's own (it reads only self.eos)

    def next_token_logprobs(self, prompts, token_ids):
        rows = []
        for p in prompts:
            pr = self.probs(self.tok.decode(p))
            rows.append([math.log(x) if x > 0 else -math.inf for x in pr])
        return torch.tensor(rows, dtype=torch.float64)                    # [B, len(token_ids)]


def pairwise_judge(mark: str = MARK) -> Callable[[str, int, int], str]:
    """A pairwise judge (recipes.h2h's PAIR_TEMPLATE) that prefers the reply carrying `mark`: the
    verdict names the reply section (between 'Reply 1:' and 'Reply 2:', or after 'Reply 2:') that holds
    it; with the mark in neither or both it always says 1 (a position-biased judge)."""
    def reply(text: str, seed: int, j: int) -> str:
        m = re.search(r"Reply 1:\n(.*)\n\nReply 2:\n(.*)\n\nGive your reasons", text, re.S)
        assert m, f"not a pairwise judge prompt: {text[:200]!r}"
        one, two = mark in m.group(1), mark in m.group(2)
        return f"Reply {2 if two and not one else 1} is the better one.\nBetter: {2 if two and not one else 1}"
    return reply
