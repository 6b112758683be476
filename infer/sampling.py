"""Batched sampling with per-request settings and per-request random generators.

Each row's token depends only on that row's logits and its own torch.Generator, never on the other rows
of the batch: the filtering (temperature, top-k, top-p) is row-wise, and the randomness is one uniform
draw per row from the row's generator, turned into a token by inverse-CDF over the kept probabilities.
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] fp32 -> token ids [B] (long). temperature 0 = greedy (argmax)."""
    B, V = logits.shape
    out = logits.argmax(-1)
    rows = [i for i in range(B) if temperature[i] > 0]
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    temp = torch.tensor([temperature[i] for i in rows], device=dev, dtype=torch.float32)
    p = torch.tensor([top_p[i] for i in rows], device=dev, dtype=torch.float32)
    k = torch.tensor([top_k[i] if top_k[i] > 0 else V for i in rows], device=dev)
    x = logits[idx] / temp[:, None]                                  # [R, V]
    filtered = bool((p < 1).any() or (k < V).any())
    order = None
    if filtered:
        x, order = x.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(x, dim=-1)
    if filtered:
        cum = probs.cumsum(-1)
        drop = (cum - probs) >= p[:, None]                           # mass before it already reaches p
        drop |= torch.arange(V, device=dev)[None, :] >= k[:, None]
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)                                           # [R, V], unnormalised
    # one uniform per row from that request's own generator (CPU generators: same stream on any device)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(dev)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(V - 1)  # [R, 1]
    tok = pick[:, 0] if order is None else order.gather(1, pick)[:, 0]
    out[idx] = tok
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of `tokens` [B] under the unmodified distribution log_softmax(logits [B, V]) -> [B]."""
    return (logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).float()
