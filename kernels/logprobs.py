"""Fused linear -> log-softmax -> gather: per-token log-probs without ever holding [N, V] logits.

    logp[i] = (h[i] @ W.T)[t[i]] - logsumexp(h[i] @ W.T)

Tokens are processed in chunks of `chunk` rows: the forward keeps only the per-token logsumexp; the
backward recomputes each chunk's logits and turns them into gradients at once
(d logits = g * (onehot(t) - softmax)), accumulating dW chunk by chunk. Peak extra memory is one chunk
of logits, [chunk, V], instead of several copies of [N, V]. Targets equal to `ignore_index` give
log-prob 0 and no gradient. SFT's cross-entropy and every DPO loss are built on this.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        # h: [N, H]; weight: [V, H]; targets: [N] -> logp: [N] fp32
        N = h.shape[0]
        logp = torch.zeros(N, dtype=torch.float32, device=h.device)
        lse = torch.zeros(N, dtype=torch.float32, device=h.device)
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, 0)
        for s in range(0, N, chunk):
            logits = (h[s:s + chunk] @ weight.T).float()              # [c, V]
            picked = logits.gather(1, safe_t[s:s + chunk, None])[:, 0]
            m = logits.amax(dim=-1)                                    # logsumexp in place: one [c, V]
            lse[s:s + chunk] = logits.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)
            logp[s:s + chunk] = picked - lse[s:s + chunk]
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(h, weight, safe_t, valid, lse)
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(ctx, g):
        h, weight, safe_t, valid, lse = ctx.saved_tensors
        chunk = ctx.chunk
        g = torch.where(valid, g.float(), torch.zeros_like(g, dtype=torch.float32))
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            logits = (hc @ weight.T).float()                          # [c, V]
            dlogits = logits.sub_(lse[s:s + chunk, None]).exp_()       # softmax, in place
            dlogits.mul_(-g[s:s + chunk, None])
            dlogits.scatter_add_(1, safe_t[s:s + chunk, None], g[s:s + chunk, None])
            if dh is not None:
                dh[s:s + chunk] = (dlogits.to(weight.dtype) @ weight).to(h.dtype)
            if dw is not None:
                dw.addmm_(dlogits.T, hc.float())
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def linear_logprobs_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """h: [N, H]; weight: [V, H]; targets: [N] -> per-token log-probs [N] (fp32).
    Cross-entropy is -logp (averaged over targets != ignore_index)."""
    return _ChunkedLinearLogprobs.apply(h, weight, targets, chunk, ignore_index)


def linear_logprobs(h, weight, targets, chunk: int = 1024, ignore_index: int = IGNORE_INDEX):
    from selfreward.kernels.ops import use_triton
    if use_triton(h):
        from selfreward.kernels.logprobs_triton import linear_logprobs_triton
        return linear_logprobs_triton(h, weight, targets, chunk, ignore_index)
    return linear_logprobs_ref(h, weight, targets, chunk, ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of lm_head(h) against targets, on the fused log-probs (never [N, V]).
    reduction: "mean" (over targets != ignore_index), "sum", or "none" ([N], 0 where ignored)."""
    nll = -linear_logprobs(h, weight, targets, chunk, ignore_index)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / (targets != ignore_index).sum().clamp_min(1)
    raise ValueError(f"linear_cross_entropy: reduction must be mean, sum or none, not {reduction!r}")
