"""One request's state inside the engine (Sequence) and the knobs a caller sets on it (SamplingParams)."""

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from selfreward.ranges import check_number


@dataclass
class SamplingParams:
    """Per-request sampling settings (infer/README.md, "API": stopping, log-probs). temperature 0 = greedy;
    top_k 0, top_p 1.0, min_p 0 = off; seed None: one drawn from torch's global generator."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | list[int] = ()
    stop: tuple[str, ...] | list[str] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens"):   # a ValueError naming it (NaN too)
            check_number(name, getattr(self, name))
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def per_prompt(prompts: list, params: "SamplingParams | list[SamplingParams] | None") -> list["SamplingParams"]:
    """One SamplingParams per prompt: the list given, or the one (default) repeated."""
    plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
    return plist


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str          # "stop" | "length"


class Kind(Enum):
    GENERATE = auto()   # sample new tokens
    SCORE = auto()      # teacher-forced log-probs of token_ids[num_prompt:]
    NEXT = auto()       # full log-softmax after the last token (next_token_logprobs)


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """token_ids holds prompt + generated tokens. The KV cache holds the first `num_cached` of them
    (after a prefill: all but the newest sampled token). block_table lists this sequence's KV blocks."""
    token_ids: list[int]
    params: SamplingParams
    kind: Kind = Kind.GENERATE
    request: int = 0                    # index of the caller's prompt
    sample: int = 0                     # index among the request's n samples
    # one per sample this sequence stands for (None: greedy): n until it forks at its first sampled token
    generators: list[torch.Generator | None] = field(default_factory=lambda: [None])
    seq_id: int = field(default_factory=lambda: next(_ids))
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0                 # tokens whose K/V are in the cache
    chunk: int = 0                      # prefill: tokens computed in this step (num_cached onward)
    num_keyed: int = 0                  # leading blocks keyed for the prefix cache (computed and full)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None             # set when a stop string cut the text
    num_prompt: int = -1

    def __post_init__(self):
        if self.num_prompt < 0:
            self.num_prompt = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def need_from(self) -> int:
        """First position whose output this sequence needs: the prefix cache serves only tokens before it."""
        if self.kind is Kind.SCORE:
            return self.num_prompt - 1
        return len(self.token_ids) - 1
