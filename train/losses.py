"""The losses on kernels.linear_logprobs (no [tokens, vocab] logits): SFT log-prob sums, the one-pass DPO
log-probs, the DPO loss family and its reference cache, the online-RL estimators. Formulas and papers:
train/README.md, "The DPO step" and "Online RL".
"""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import selfreward.kernels.ops as K
from selfreward.model.llama import AttnContext, context_from_positions
from selfreward.ranges import ConfigError
from selfreward.records import write_atomic
from selfreward.train.data import IGNORE, FlatBatch, Pair, pair_batch

LOSS_TYPES = ("sigmoid", "ipo", "cdpo", "robust", "simpo")
SMOOTHED = ("cdpo", "robust")           # the losses that take a label-smoothing eps


def resolve_loss_settings(loss: str, beta: float | None, label_smoothing: float | None,
                          simpo_gamma: float | None) -> tuple[float, float, float]:
    """The trainer's flags -> (beta, eps, gamma), which map to themselves; None = the loss's paper default
    (train/README.md, "Flags"). ConfigError: a setting the loss does not use, or out of its range."""
    if loss not in LOSS_TYPES:
        raise ConfigError(f"--loss {loss!r}: not a loss type; choose one of {', '.join(LOSS_TYPES)}")
    if label_smoothing and loss not in SMOOTHED:
        raise ConfigError(f"--label-smoothing: label smoothing applies to --loss {' / '.join(SMOOTHED)} only, "
                         f"not {loss}")
    if simpo_gamma and loss != "simpo":
        raise ConfigError(f"--simpo-gamma applies to --loss simpo only, not {loss}")
    beta = (2.0 if loss == "simpo" else 0.1) if beta is None else beta
    if beta <= 0:
        raise ConfigError(f"--beta {beta:g}: must be > 0 (--loss {loss} divides by it or scales by it)")
    eps = (0.1 if label_smoothing is None else label_smoothing) if loss in SMOOTHED else 0.0
    if not 0 <= eps < 0.5:
        raise ConfigError(f"--label-smoothing {eps}: must lie in [0, 0.5) (the assumed share of flipped labels)")
    gamma = (0.5 * beta if simpo_gamma is None else simpo_gamma) if loss == "simpo" else 0.0
    return beta, eps, gamma


def target_hidden(model, tokens, positions, ctx: AttnContext, targets):
    """-> (the last hidden states of the target rows [n, H], those rows [n], their targets [n]), on the model's
    device; only target rows go through the last block's queries and feed-forward (out_rows)."""
    dev = model.lm_head_weight.device           # batches are built on the CPU; the model may live on a GPU
    tokens, positions, targets = tokens.to(dev), positions.to(dev), targets.to(dev)
    ctx = AttnContext(ctx.cu_seqlens.to(dev), ctx.max_seqlen, prefix=None if ctx.prefix is None else ctx.prefix.to(dev))
    sel = torch.nonzero(targets != IGNORE).flatten()
    return model(tokens, positions, ctx, out_rows=sel), sel, targets[sel]


def token_logps(model, tokens, positions, ctx: AttnContext, targets) -> torch.Tensor:
    """[N] log-prob of each target (0 where IGNORE), through the chunked fused kernel."""
    h, sel, tgt = target_hidden(model, tokens, positions, ctx, targets)
    lp = K.linear_logprobs(h, model.lm_head_weight, tgt, ignore_index=IGNORE)   # [n]
    return h.new_zeros(targets.shape, dtype=lp.dtype).index_put((sel,), lp)


def sft_logp_sum(model, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Packed rows (train.data.pack_rows) -> (sum of target log-probs, number of targets)."""
    pos, ctx = context_from_positions(rows["positions"])
    tgt = rows["targets"].reshape(-1)
    lp = token_logps(model, rows["input_ids"].reshape(-1), pos, ctx, tgt)
    return lp.sum(), int((tgt != IGNORE).sum())


def sequence_logps(model, b: FlatBatch) -> torch.Tensor:
    """One forward over the batch's sequences -> summed response log-probs [2B] (chosen first)."""
    lp = token_logps(model, b.tokens, b.positions, AttnContext(b.cu_seqlens, b.max_seqlen, prefix=b.prefix), b.targets)
    # sums in fp64: a response of thousands of tokens would lose the digits the DPO margin lives in
    return seq_sums(lp, b.seq_id.to(lp.device), b.cu_seqlens.numel() - 1)[b.out_seq.to(lp.device)]   # [S] -> [2B]


def seq_sums(x: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """[M] -> [n] the sums over each sequence's tokens (fp64)."""
    return torch.zeros(n, dtype=torch.float64, device=x.device).index_add(0, seq, x.double())


@dataclass
class DPOLossConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0    # cdpo / robust only: eps in [0, 0.5)
    simpo_gamma: float = 1.0        # simpo only: target reward margin (paper: 0.5 x beta, beta 2)
    nll_alpha: float = 0.0          # + alpha * NLL of the chosen response per token (RPO, Pang et al. 2024)

    def __post_init__(self):
        resolve_loss_settings(self.loss_type, self.beta, self.label_smoothing, None)   # refuses what it refuses

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor | None, resp_len: torch.Tensor, cfg: DPOLossConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """policy, ref: [2B] summed response log-probs (chosen first); resp_len: [2B].
    -> per-pair loss [B], chosen rewards [B], rejected rewards [B]."""
    B, beta, eps = policy.numel() // 2, cfg.beta, cfg.label_smoothing
    lens = resp_len.clamp(min=1).to(policy)
    if cfg.loss_type == "simpo":
        r = beta * (policy / lens)
        loss = -F.logsigmoid(r[:B] - r[B:] - cfg.simpo_gamma)
    else:
        ratio = policy - ref.to(policy)                                  # [2B]
        r, z = beta * ratio, ratio[:B] - ratio[B:]
        if cfg.loss_type == "sigmoid":
            loss = -F.logsigmoid(beta * z)
        elif cfg.loss_type == "ipo":
            per_tok = ratio / lens
            loss = (per_tok[:B] - per_tok[B:] - 1 / (2 * beta)) ** 2
        elif cfg.loss_type == "cdpo":
            loss = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
        else:   # robust (rDPO): the sign of the flipped term is +, and the whole divided by 1 - 2 eps
            loss = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if cfg.nll_alpha:
        loss = loss - cfg.nll_alpha * policy[:B] / lens[:B]
    return loss, r[:B].detach(), r[B:].detach()


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ReferenceCache:
    """Reference log-probs [pairs, 2] in `dir/ref_logps-<data hash>-<weights hash>.pt` (README "The DPO step")."""

    def __init__(self, directory: str | Path, pairs: list[Pair], weights_key: str):
        h = hashlib.sha256()
        for p in pairs:
            for part in (p.prompt, p.chosen, p.rejected):
                h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
        self.path = Path(directory) / f"ref_logps-{h.hexdigest()[:16]}-{weights_key}.pt"

    def load(self) -> torch.Tensor | None:
        return torch.load(self.path) if self.path.exists() else None

    def save(self, table: torch.Tensor) -> None:
        buf = io.BytesIO()
        torch.save(table, buf)
        write_atomic(self.path, buf.getvalue())


@torch.no_grad()
def compute_reference(model, pairs: list[Pair], indices: list[int], batch_pairs: int, share_prompt: bool = True
                      ) -> torch.Tensor:
    """Reference log-probs of pairs[indices] in eval mode (no dropout) -> [len(indices), 2]."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(indices), batch_pairs):
        chunk = [pairs[i] for i in indices[s:s + batch_pairs]]
        lp = sequence_logps(model, pair_batch(chunk, share_prompt))
        out.append(torch.stack([lp[:len(chunk)], lp[len(chunk):]], 1))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


# ---- online RL (train/rl.py): B responses, their M tokens end to end, `seq` [M] naming each token's response
# (contiguous, in order); every result a SUM over the batch (the trainer divides by the global responses)


@dataclass
class PGOut:
    loss: torch.Tensor        # () pg + value_coef * value, summed over the batch (with grad)
    pg: torch.Tensor          # () the policy-gradient part
    value: torch.Tensor       # () 0.5 sum (V - G)^2
    advantages: torch.Tensor  # [M] per token (RLOO: the response's advantage on each of its tokens)


def kl_per_token(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[M] k1 = log pi - log pi_ref at the sampled tokens, without gradient."""
    return (logp.detach() - ref).double()


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
    return PGOut(pg + value_coef * v, pg, v, A)


def reinforce_loss(logp: torch.Tensor, values: torch.Tensor, ref: torch.Tensor, seq: torch.Tensor,
                   rewards: torch.Tensor, group: torch.Tensor | None, beta: float, value_coef: float = 1.0) -> PGOut:
    """REINFORCE minus the value head's baseline. logp, values [M] (grad), ref [M], seq [M], rewards [B]."""
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
