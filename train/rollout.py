"""train/'s one seam into infer/ (train/README.md, "Layers", "Weight hand-off"): the RL sampler, its weights,
rollouts and greedy probes; and the rollout batch."""

import functools
import time
from dataclasses import dataclass

import torch

import selfreward.kernels.ops as K
from selfreward.infer.config import EngineConfig, load_engine  # noqa: F401  (for rl.py)
from selfreward.infer.sequence import SamplingParams
from selfreward.model.llama import AttnContext
from selfreward.train import data
from selfreward.train.data import IGNORE, FlatBatch
from selfreward.train.losses import target_hidden

VALUE_HEAD = "value_head."         # the trainer's extra parameters, never handed to the engine


@dataclass
class Rollout:
    prompt: str                    # the prompt text (what the reward sees)
    prompt_ids: list[int]          # chat ids with the generation prompt (what the policy saw)
    response_ids: list[int]        # as sampled, the stop token included when it stopped
    text: str                      # the reply text (without the stop token)
    group: int                     # the prompt's index within this rank's share of the step
    finish: str                    # stop | length
    reward: float = 0.0


def sync_weights(engine, model) -> float:
    """The trainer's weights into the engine (README "Weight hand-off") -> seconds."""
    return engine.load_weights(model, skip=(VALUE_HEAD,))["seconds"]


def sample(engine, tok, prompts: list[str], n: int, temperature: float, top_p: float, max_tokens: int,
           seeds: list[int]) -> tuple[list[Rollout], float]:
    """n responses per prompt; prompt k's samples use seeds[k], seeds[k] + 1, ... -> (rollouts, seconds)."""
    t0 = time.perf_counter()
    ids = [tok.user_ids(p) for p in prompts]
    ps = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s) for s in seeds]
    outs = engine.generate(ids, ps, n=n)
    rolls = [Rollout(p, i, list(c.token_ids), c.text, k, c.finish_reason)
             for k, (p, i, group) in enumerate(zip(prompts, ids, outs)) for c in group]
    return rolls, time.perf_counter() - t0


def greedy(engine, prompts: list[list[int]], max_tokens: int) -> list:
    """Greedy replies with the log-prob of each token (rl.py's probes of what the sampler holds)."""
    return [o[0] for o in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                    logprobs=True))]


@dataclass
class RolloutBatch(FlatBatch):
    """The rollouts end to end, prompt + response[:-1] each, with their rewards and prompts."""
    rewards: torch.Tensor | None = None   # [B]
    group: torch.Tensor | None = None     # [B] the prompt's index (RLOO groups)

    @functools.cached_property
    def seq(self) -> torch.Tensor:   # [M] which rollout each response token (target) belongs to, in order
        return self.seq_id[self.targets != IGNORE]


def flat_batch(rolls: list[Rollout], device="cpu") -> RolloutBatch:
    b = vars(data.flat_batch([(r.prompt_ids, r.response_ids) for r in rolls]))
    b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
    f = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return RolloutBatch(**b, rewards=f([r.reward for r in rolls], torch.float64),
                        group=f([r.group for r in rolls], torch.long))


def response_hidden(model, b: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (`model`'s last hidden states before each response token [M, H], those tokens [M])."""
    h, _, tgt = target_hidden(model, b.tokens, b.positions, AttnContext(b.cu_seqlens, b.max_seqlen), b.targets)
    return h, tgt


def response_logps(model, b: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-probs of the response tokens at the sampling temperature [M], their hidden states [M, H]).
    The logits are h W^T / T, so dividing h by T gives exactly the sampled distribution's log-probs."""
    h, tgt = response_hidden(model, b)
    return K.linear_logprobs(h / temperature, model.lm_head_weight, tgt, ignore_index=IGNORE), h


@torch.no_grad()
def entropy_sum(model, h: torch.Tensor, temperature: float, chunk: int = 1024) -> float:
    """Sum over rows of the entropy of the sampling distribution softmax(h W^T / T), chunked over rows."""
    tot = 0.0
    for s in range(0, h.shape[0], chunk):
        lg = model.logits(h[s:s + chunk].detach()) / temperature                # [c, V] fp32
        lp = lg.log_softmax(-1)
        tot += float(-(lp.exp() * lp).sum())
    return tot
