"""The DPO loss with the LM head's forward and backward fused, per group of pairs with its [rows, V] logits still
in memory; backward only scales dh and dW by the summed loss's upstream gradient (train/README.md, "The fused head").
"""

import torch

from selfreward.kernels.logprobs import head_logits
from selfreward.model.llama import AttnContext
from selfreward.train.data import FlatBatch
from selfreward.train.losses import target_hidden


def _groups(out_seq: list[int], B: int, seq_rows: dict[int, int], chunk: int) -> list[tuple[list[int], list[int]]]:
    """Pairs joined by a shared sequence, in units of <= chunk rows (a larger group alone): [(pairs, sequences)]."""
    parent = {s: s for s in out_seq}

    def find(s):
        while parent[s] != s:
            s = parent[s]
        return s

    for p in range(B):
        parent[find(out_seq[p])] = find(out_seq[B + p])
    comps: dict[int, tuple[list[int], list[int]]] = {}
    for p in range(B):
        pairs, seqs = comps.setdefault(find(out_seq[p]), ([], []))
        pairs.append(p)
        seqs.extend(s for s in (out_seq[p], out_seq[B + p]) if s not in seqs)
    units, cur, rows = [], ([], []), 0
    for pairs, seqs in comps.values():
        n = sum(seq_rows.get(s, 0) for s in seqs)
        if cur[0] and rows + n > chunk:
            units.append(cur)
            cur, rows = ([], []), 0
        cur[0].extend(pairs)
        cur[1].extend(seqs)
        rows += n
    if cur[0]:
        units.append(cur)
    return units


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_seq, out_seq, loss_fn, chunk):
        # h: [n, H] hidden states of the target rows; weight: [V, H]; targets, row_seq: [n]; out_seq: [2B]
        n, B = h.shape[0], out_seq.numel() // 2
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        S = int(max(int(row_seq.max()) if n else 0, int(out_seq.max()))) + 1
        s = torch.zeros(S, dtype=torch.float64, device=h.device)           # summed log-prob per sequence
        pol = torch.zeros(2 * B, dtype=torch.float64, device=h.device)
        loss, rc, rr = (torch.zeros(B, dtype=torch.float64, device=h.device) for _ in range(3))
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        seq_rows = dict(zip(*(x.tolist() for x in torch.unique(row_seq, return_counts=True))))
        for pairs, seqs in _groups(out_seq.tolist(), B, seq_rows, chunk):
            rows = torch.nonzero(torch.isin(row_seq, torch.tensor(seqs, device=h.device))).flatten()   # [r]
            pieces = list(rows.split(chunk))
            keep = len(pieces) == 1                   # one chunk: its softmax stays for the gradient
            probs, lse, hcs = None, [], []
            for r in pieces:                          # pass 1: log-probs (and, for one chunk, the softmax)
                hc = h[r]                                                       # [c, H]
                logits = head_logits(hc, weight)                                # [c, V] fp32
                picked = logits.gather(1, targets[r, None])[:, 0]
                m = logits.amax(-1)
                z = logits.sub_(m[:, None]).exp_()                              # in place: one [c, V]
                tot = z.sum(-1)
                lse.append(tot.log() + m)
                s.index_add_(0, row_seq[r], (picked - lse[-1]).double())
                if keep:
                    probs, hcs = z.div_(tot[:, None]), [hc]
            sub = torch.tensor(pairs + [p + B for p in pairs], device=h.device)    # outputs, chosen first
            with torch.enable_grad():                 # this group's loss and d loss / d s
                sl = s.detach().requires_grad_(True)
                lp = sl[out_seq[sub]]                                           # [2k]
                l_, c_, r_ = loss_fn(lp, sub)
                g_s = torch.autograd.grad(l_.sum(), sl)[0] if need_h or need_w else None
            pk = torch.tensor(pairs, device=h.device)
            pol[sub], loss[pk], rc[pk], rr[pk] = lp.detach(), l_.detach(), c_, r_
            total = total + l_.detach().sum()
            if g_s is None:
                continue
            for r, ls in zip(pieces, lse):            # pass 2 (several chunks: the logits recomputed)
                hc = hcs[0] if keep else h[r]
                p = probs if keep else head_logits(hc, weight).sub_(ls[:, None]).exp_()     # [c, V] softmax
                g = g_s[row_seq[r]].float()[:, None]                             # [c, 1]
                dlogits = p.mul_(-g).scatter_add_(1, targets[r, None], g)       # g (onehot - softmax)
                if need_h:
                    dh[r] = (dlogits.to(weight.dtype) @ weight).to(h.dtype)
                if need_w:
                    dw.addmm_(dlogits.T, hc.float())
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = weight.dtype
        ctx.mark_non_differentiable(pol, loss, rc, rr)
        return total, pol, loss, rc, rr

    @staticmethod
    def backward(ctx, g_total, *_):
        dh, dw = ctx.saved_tensors
        c = float(g_total)                            # d (whatever the trainer backpropagates) / d total
        return (dh * c if dh is not None else None, (dw * c).to(ctx.w_dtype) if dw is not None else None,
                None, None, None, None, None)


def pair_head_loss(model, b: FlatBatch, loss_fn, chunk: int = 1024):
    """One forward, then the fused head + loss. loss_fn(policy [2k] chosen first, output indices [2k]) -> (loss,
    chosen rewards, rejected rewards) [k] each. -> (summed loss, policy [2B], loss [B], rewards [B], [B])."""
    ctx = AttnContext(b.cu_seqlens, b.max_seqlen, prefix=b.prefix)
    h, sel, targets = target_hidden(model, b.tokens, b.positions, ctx, b.targets)     # [n, H], [n], [n]
    return _HeadLoss.apply(h, model.lm_head_weight, targets, b.seq_id.to(h.device)[sel], b.out_seq.to(h.device),
                           loss_fn, chunk)
