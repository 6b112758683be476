"""The policy-gradient estimators of train/rl.py and the per-token KL, on a flat batch of rollouts.

A batch holds B sampled responses; its M response tokens lie end to end (`seq` [M] names each token's
response, responses contiguous and in order). Per token t of response i:
    logp[t]   log pi(y_t | x, y_<t) under the policy, at the sampling temperature (carries the gradient)
    ref[t]    the same under the frozen SFT policy
    kl[t]     logp - ref, detached: the k1 estimate of KL(pi || pi_ref) at the sampled token
    G[t]      R_i - beta * sum_{s >= t in i} kl[s]: the return to go when the KL penalty is paid per token
              and the reward R_i at the response's end (no discount), as in Ziegler et al. 2019 / RLAIF
REINFORCE with a learned value baseline ("reinforce"): A[t] = G[t] - V[t] with V the value head's
estimate at the state before y_t (detached in A); loss = -sum_t logp[t] A[t] + 0.5 sum_t (V[t] - G[t])^2.
RLOO ("rloo"): one advantage per response, A_i = R'_i - mean of R'_j over the other responses of its
prompt, with R'_i = R_i - beta sum_t kl[t]; loss = -sum_i A_i sum_{t in i} logp[t]; the value head is
still fitted (the same regression) but unused.
Everything returned is a SUM over the batch; the trainer divides by the responses of the global batch.
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


def reinforce_loss(logp: torch.Tensor, values: torch.Tensor, ref: torch.Tensor, seq: torch.Tensor,
                   rewards: torch.Tensor, group: torch.Tensor | None, beta: float, value_coef: float = 1.0) -> PGOut:
    """REINFORCE minus the value head's baseline. logp, values [M] (grad), ref [M], seq [M], rewards [B];
    `group` is not used (one signature for both estimators)."""
    G = returns_to_go(kl_per_token(logp, ref), seq, rewards, beta)
    A = G - values.detach().double()
    pg = -(logp.double() * A).sum()
    v = 0.5 * ((values.double() - G) ** 2).sum()
    return PGOut(pg + value_coef * v, pg, v, A, G)


def rloo_loss(logp: torch.Tensor, values: torch.Tensor, ref: torch.Tensor, seq: torch.Tensor,
              rewards: torch.Tensor, group: torch.Tensor, beta: float, value_coef: float = 1.0) -> PGOut:
    """RLOO: group [B] says which prompt each response answers; every group needs >= 2 responses."""
    B = rewards.numel()
    kl = kl_per_token(logp, ref)
    R = rewards.double() - beta * seq_sums(kl, seq, B)                   # [B] penalised rewards
    G_ = torch.zeros(int(group.max()) + 1, dtype=torch.float64, device=R.device)
    tot = G_.index_add(0, group, R)                                      # [P] per-prompt sums
    cnt = torch.zeros_like(G_).index_add(0, group, torch.ones_like(R))
    if bool((cnt[group] < 2).any()):
        raise ValueError("RLOO needs at least 2 responses per prompt (--num-samples >= 2)")
    adv = R - (tot[group] - R) / (cnt[group] - 1)                        # [B] leave-one-out baseline
    A = adv[seq]
    pg = -(logp.double() * A).sum()
    G = returns_to_go(kl, seq, rewards, beta)
    v = 0.5 * ((values.double() - G) ** 2).sum()
    return PGOut(pg + value_coef * v, pg, v, A, G)
