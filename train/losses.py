"""Losses: SFT cross-entropy and the DPO family, all on kernels.linear_logprobs (no [tokens, vocab] logits).

The fused DPO pass: the chosen and rejected sequences of a batch go through the policy in ONE forward over a
flat token axis (train.data.FlatBatch), the per-token log-probs summed per sequence; the reference log-probs
come from a no-grad pass over the same batch or from the on-disk cache (ReferenceCache). The variants
(sigmoid, ipo, cdpo, robust, simpo; + nll_alpha, RPO) and their papers: train/README.md, "The DPO step".
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import selfreward.kernels.ops as K
from selfreward.model.llama import AttnContext, context_from_positions
from selfreward.records import write_atomic
from selfreward.train.data import IGNORE, Pair, FlatBatch, pair_batch

LOSS_TYPES = ("sigmoid", "ipo", "cdpo", "robust", "simpo")
SMOOTHED = ("cdpo", "robust")           # the losses that take a label-smoothing eps
# the defaults of each loss's paper: beta 0.1 for the DPO family (Self-Rewarding LMs, DPO); SimPO (Meng et al.
# 2024) uses beta 2.0-2.5 with gamma / beta about 0.5; eps 0.1 for cdpo / robust
DEFAULT_BETA = {"simpo": 2.0}
SIMPO_GAMMA_BETA_RATIO = 0.5
DEFAULT_LABEL_SMOOTHING = 0.1


def resolve_loss_settings(loss: str, beta: float | None, label_smoothing: float | None,
                          simpo_gamma: float | None) -> tuple[float, float, float]:
    """The trainer's flags -> (beta, eps, gamma); None = the loss's default (beta 0.1, or 2.0 for simpo; gamma
    0.5 x beta; eps 0.1). Refused (ValueError): a negative value, a label smoothing above 0 for a loss that has
    none, a gamma above 0 for a loss other than simpo. The result maps to itself."""
    if loss not in LOSS_TYPES:
        raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSS_TYPES)}")
    for flag, v in (("--beta", beta), ("--label-smoothing", label_smoothing), ("--simpo-gamma", simpo_gamma)):
        if v is not None and v < 0:
            raise ValueError(f"{flag} {v:g}: must be >= 0 (leave it out for the loss's default)")
    label_smoothing = -1.0 if label_smoothing is None else label_smoothing
    simpo_gamma = -1.0 if simpo_gamma is None else simpo_gamma
    beta = DEFAULT_BETA.get(loss, 0.1) if beta is None else beta
    if beta <= 0:
        raise ValueError(f"--beta {beta:g}: must be > 0 (--loss {loss} divides by it or scales by it)")
    if loss in SMOOTHED:
        eps = DEFAULT_LABEL_SMOOTHING if label_smoothing < 0 else label_smoothing
        if not 0 <= eps < 0.5:
            raise ValueError(f"--label-smoothing {eps}: must lie in [0, 0.5) (the assumed share of flipped labels)")
    elif label_smoothing > 0:
        raise ValueError(f"--label-smoothing applies to --loss {' / '.join(SMOOTHED)} only, not {loss}")
    else:
        eps = 0.0
    if loss == "simpo":
        gamma = SIMPO_GAMMA_BETA_RATIO * beta if simpo_gamma < 0 else simpo_gamma
    elif simpo_gamma > 0:
        raise ValueError(f"--simpo-gamma applies to --loss simpo only, not {loss}")
    else:
        gamma = 0.0
    return beta, eps, gamma


def token_logps(model, tokens, positions, ctx: AttnContext, targets) -> torch.Tensor:
    """[N] log-prob of each target (0 where IGNORE), through the chunked fused kernel. Only the target
    rows go through the LM head: in DPO and chat SFT the prompt rows, often half the tokens or more, would
    cost a [rows, V] GEMM (V = 32k-128k) three times over (forward, recompute, gradient) for nothing; nor
    through the last block's queries and feed-forward (Transformer.forward's out_rows)."""
    dev = model.lm_head_weight.device           # batches are built on the CPU; the model may live on a GPU
    if tokens.device != dev:
        tokens, positions, targets = tokens.to(dev), positions.to(dev), targets.to(dev)
        ctx = AttnContext(ctx.cu_seqlens.to(dev), ctx.max_seqlen,
                          prefix=None if ctx.prefix is None else ctx.prefix.to(dev))
    sel = torch.nonzero(targets != IGNORE).flatten()                    # [n] target rows
    h = model(tokens, positions, ctx, out_rows=sel)                     # [n, H]
    lp = K.linear_logprobs(h, model.lm_head_weight, targets[sel], ignore_index=IGNORE)   # [n]
    return h.new_zeros(targets.shape, dtype=lp.dtype).index_put((sel,), lp)


def sft_logp_sum(model, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Packed rows (train.data.pack_rows) -> (sum of target log-probs, number of targets).
    SFT loss = -sum / (targets in the global batch)."""
    pos, ctx = context_from_positions(rows["positions"])
    tgt = rows["targets"].reshape(-1)
    lp = token_logps(model, rows["input_ids"].reshape(-1), pos, ctx, tgt)
    return lp.sum(), int((tgt != IGNORE).sum())


def sequence_logps(model, b: FlatBatch) -> torch.Tensor:
    """One forward over the batch's sequences -> summed response log-probs [2B] (chosen first)."""
    ctx = AttnContext(cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, prefix=b.prefix)
    lp = token_logps(model, b.tokens, b.positions, ctx, b.targets)     # [N] fp32
    S = b.cu_seqlens.numel() - 1
    # sums in fp64: a response of thousands of tokens would lose the digits the DPO margin lives in
    per_seq = torch.zeros(S, dtype=torch.float64, device=lp.device).index_add(0, b.seq_id.to(lp.device), lp.double())
    return per_seq[b.out_seq.to(lp.device)]                            # [S] -> [2B]


@dataclass
class DPOLossConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0    # cdpo / robust only: eps in [0, 0.5)
    simpo_gamma: float = 1.0        # simpo only: target reward margin (paper: 0.5 x beta, beta 2)
    nll_alpha: float = 0.0          # + alpha * NLL of the chosen response per token (RPO, Pang et al. 2024)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss type {self.loss_type!r}: choose one of {LOSS_TYPES}")
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(f"label smoothing applies to {SMOOTHED} only, not {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label smoothing {self.label_smoothing}: must lie in [0, 0.5)")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor | None, resp_len: torch.Tensor, cfg: DPOLossConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """policy, ref: [2B] summed response log-probs (chosen first); resp_len: [2B].
    -> per-pair loss [B], chosen rewards [B], rejected rewards [B]."""
    loss, rc, rr = _preference_loss(policy, ref, resp_len, cfg)
    if cfg.nll_alpha:
        B = policy.numel() // 2
        loss = loss - cfg.nll_alpha * policy[:B] / resp_len[:B].clamp(min=1).to(policy)
    return loss, rc, rr


def _preference_loss(policy, ref, resp_len, cfg: DPOLossConfig):
    B = policy.numel() // 2
    beta = cfg.beta
    if cfg.loss_type == "simpo":
        avg = policy / resp_len.clamp(min=1).to(policy)
        rc, rr = beta * avg[:B], beta * avg[B:]
        return -F.logsigmoid(rc - rr - cfg.simpo_gamma), rc.detach(), rr.detach()
    if ref is None:
        raise ValueError(f"loss {cfg.loss_type} needs reference log-probs")
    ratio = policy - ref.to(policy)                                      # [2B]
    z = ratio[:B] - ratio[B:]
    if cfg.loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * z)
    elif cfg.loss_type == "ipo":
        per_tok = ratio / resp_len.clamp(min=1).to(ratio)
        loss = (per_tok[:B] - per_tok[B:] - 1 / (2 * beta)) ** 2
    elif cfg.loss_type == "cdpo":
        eps = cfg.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    else:   # robust (rDPO): the sign of the flipped term is +, and the whole divided by 1 - 2 eps
        eps = cfg.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    return loss, beta * ratio[:B].detach(), beta * ratio[B:].detach()


# ---- the reference log-prob cache ----------------------------------------------------------------
def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def pairs_hash(pairs: list[Pair]) -> str:
    """Hash of the tokenized, truncated pairs: covers the data, the tokenizer and the truncation settings."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


class ReferenceCache:
    """Summed reference log-probs of every pair, [num_pairs, 2] (chosen, rejected), in
    `dir/ref_logps-<data hash>-<weights hash>.pt`, written atomically."""

    def __init__(self, directory: str | Path, pairs: list[Pair], weights_key: str):
        self.path = Path(directory) / f"ref_logps-{pairs_hash(pairs)}-{weights_key}.pt"

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
