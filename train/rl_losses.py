"""The policy-gradient estimators of train/rl.py and the per-token KL, on a flat batch of rollouts: B
responses, their M tokens end to end (`seq` [M] names each token's response; responses contiguous, in order).
Everything returned is a SUM over the batch (the trainer divides by the global batch's responses). The
formulas and their papers: train/README.md, "Online RL".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("reinforce", "rloo")


@dataclass
class PGOut:
    loss: torch.Tensor        # () pg + value_coef * value, summed over the batch (with grad)
    pg: torch.Tensor          # () the policy-gradient part
    value: torch.Tensor       # () 0.5 sum (V - G)^2
    advantages: torch.Tensor  # [M] per token (RLOO: the response's advantage on each of its tokens)
    returns: torch.Tensor     # [M] G


def kl_per_token(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[M] k1 = log pi - log pi_ref at the sampled tokens, without gradient."""
    return (logp.detach() - ref).double()


def seq_sums(x: torch.Tensor, seq: torch.Tensor, B: int) -> torch.Tensor:
    """[M] -> [B] per-response sums (fp64)."""
    return torch.zeros(B, dtype=torch.float64, device=x.device).index_add(0, seq, x.double())


def returns_to_go(kl: torch.Tensor, seq: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """[M] G[t] = R_seq(t) - beta * (sum of kl from t to the end of its response). Responses contiguous."""
    c = kl.double().cumsum(0)                                           # [M]
    B = rewards.numel()
    last = torch.zeros(B, dtype=torch.long, device=kl.device).scatter_reduce(
        0, seq, torch.arange(len(seq), device=kl.device), "amax")       # [B] index of each response's last token
    suffix = c[last][seq] - c + kl.double()                             # sum_{s >= t} kl[s]
    return rewards.double()[seq] - beta * suffix


def _pg(logp, values, G, A, value_coef: float) -> PGOut:
    pg = -(logp.double() * A).sum()
    v = 0.5 * ((values.double() - G) ** 2).sum()
    return PGOut(pg + value_coef * v, pg, v, A, G)


def reinforce_loss(logp: torch.Tensor, values: torch.Tensor, ref: torch.Tensor, seq: torch.Tensor,
                   rewards: torch.Tensor, group: torch.Tensor | None, beta: float, value_coef: float = 1.0) -> PGOut:
    """REINFORCE minus the value head's baseline. logp, values [M] (grad), ref [M], seq [M], rewards [B];
    `group` is not used (one signature for both estimators)."""
    G = returns_to_go(kl_per_token(logp, ref), seq, rewards, beta)
    return _pg(logp, values, G, G - values.detach().double(), value_coef)


def rloo_loss(logp: torch.Tensor, values: torch.Tensor, ref: torch.Tensor, seq: torch.Tensor,
              rewards: torch.Tensor, group: torch.Tensor, beta: float, value_coef: float = 1.0) -> PGOut:
    """RLOO: group [B] says which prompt each response answers; every group needs >= 2 responses."""
    kl = kl_per_token(logp, ref)
    R = rewards.double() - beta * seq_sums(kl, seq, rewards.numel())     # [B] penalised rewards
    zeros = torch.zeros(int(group.max()) + 1, dtype=torch.float64, device=R.device)
    tot, cnt = zeros.index_add(0, group, R), zeros.index_add(0, group, torch.ones_like(R))   # [P] per prompt
    if bool((cnt[group] < 2).any()):
        raise ValueError("RLOO needs at least 2 responses per prompt (--num-samples >= 2)")
    adv = R - (tot[group] - R) / (cnt[group] - 1)                        # [B] leave-one-out baseline
    return _pg(logp, values, returns_to_go(kl, seq, rewards, beta), adv[seq], value_coef)
