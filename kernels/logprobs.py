"""Fused linear -> log-softmax -> gather: per-token log-probs without ever holding [N, V] logits, in chunks
of `chunk` tokens (kernels/README.md, "The ops": the forward, the in-place backward, the memory bound).

    logp[i] = (h[i] @ W.T)[t[i]] - logsumexp(h[i] @ W.T)          (0 and no gradient where t[i] == ignore_index)
"""

import torch

IGNORE_INDEX = -100


class ChunkedLogprobs(torch.autograd.Function):
    """The chunk loop. `rows` = (forward, backward), each on one chunk of logits [c, V]:
    forward(logits, t, lse, logp, ignore_index) fills lse and logp [c] (logp 0 where ignored; may clobber
    logits); backward(logits, t, lse, g) overwrites logits with d logits (ignored rows: t 0 and g 0).
    upcast: fp32 logits (else the GEMM's dtype: the Triton kernels upcast per tile, halving the buffer)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index, rows, upcast):
        N = h.shape[0]
        logp = torch.zeros(N, dtype=torch.float32, device=h.device)
        lse = torch.zeros(N, dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            c = slice(s, s + chunk)
            rows[0](head_logits(h[c], weight, upcast), targets[c], lse[c], logp[c], ignore_index)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.ignore_index, ctx.rows, ctx.upcast = chunk, ignore_index, rows, upcast
        return logp

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, lse = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        g, t = torch.where(valid, g.float(), 0.0).contiguous(), torch.where(valid, targets, 0)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            dl = head_logits(h[c], weight, ctx.upcast)
            ctx.rows[1](dl, t[c], lse[c], g[c])
            if dh is not None:
                dh[c] = (dl.to(weight.dtype) @ weight).to(h.dtype)
            if dw is not None and dl.dtype == torch.float32:
                dw.addmm_(dl.T, h[c].float())
            elif dw is not None:                                       # bf16/fp16 GEMM, fp32 accumulator
                dw += dl.T @ h[c].to(dl.dtype)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None, None


def head_logits(hc: torch.Tensor, weight: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """[c, V] logits; upcast: fp32 GEMM and output even under autocast (--cpu-bf16), since logits of size ~20 rounded
    to bf16 move by up to 0.06 each, a sequence's summed log-prob by nats, and the backward's recomputed softmax
    would not match the forward's logsumexp."""
    if not upcast:
        return hc @ weight.T
    with torch.autocast(hc.device.type, enabled=False):
        return hc.float() @ weight.float().T


def _lse_logp(logits, t, lse, logp, ignore_index):
    valid = t != ignore_index
    picked = logits.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    m = logits.amax(dim=-1)                                            # logsumexp in place: one [c, V]
    lse.copy_(logits.sub_(m[:, None]).exp_().sum(-1).log_().add_(m))
    logp.copy_(torch.where(valid, picked - lse, 0.0))


def _dlogits(logits, t, lse, g):
    dl = logits.sub_(lse[:, None]).exp_()                              # softmax, in place
    dl.mul_(-g[:, None])
    dl.scatter_add_(1, t[:, None], g[:, None])


def linear_logprobs_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """h: [N, H]; weight: [V, H]; targets: [N] -> per-token log-probs [N] (fp32, 0 where ignored).
    Cross-entropy is -logp (averaged over targets != ignore_index)."""
    return ChunkedLogprobs.apply(h, weight, targets, chunk, ignore_index, (_lse_logp, _dlogits), True)

