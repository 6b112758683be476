"""Batched sampling, each row by its logits and its request's own generator alone (infer/README.md, "Sampling")."""

import torch

N_BUCKETS = 4096
MAX_BOUNDARY = 256     # above this many tokens in the crossing bucket, sort the row instead


def _top_p_keep_sorted(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Reference rule by sorting. q: [R, V] probabilities, p: [R] -> keep [R, V] bool."""
    s, _ = q.sort(dim=-1, descending=True)
    # mass strictly above each sorted value: the cumulative mass before the first token of that value
    before = s.cumsum(-1) - s
    first = torch.searchsorted(-s, -q, side="left")                          # index of q's first tie in s
    return before.gather(1, first) < p[:, None]


def _compact(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's masked entries gathered to the left of each row, padded with -1 to [R, M]."""
    R = mask.shape[0]
    counts = mask.sum(-1)
    M = int(counts.max()) if R else 0
    r, c = mask.nonzero(as_tuple=True)
    slot = torch.arange(len(r), device=mask.device) - (counts.cumsum(0) - counts)[r]
    out = [torch.full((R, M), -1, device=t.device, dtype=t.dtype) for t in tensors]
    for g, t in zip(out, tensors):
        g[r, slot] = t[r, c]
    return out


def top_p_keep(q: torch.Tensor, p: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """q: [R, V] probabilities (rows sum to ~1), p: [R] in (0, 1] -> keep mask [R, V]."""
    R, V = q.shape
    dev = q.device
    ar = torch.arange(N_BUCKETS, device=dev)
    pp = p[:, None]
    keep = torch.zeros(R, V, dtype=torch.bool, device=dev) if V <= MAX_BOUNDARY else None   # set at level 1
    vals = q                                             # [R, M] candidate values (-1 = padding)
    cols = torch.arange(V, device=dev).expand(R, V)      # their vocabulary columns
    base = torch.zeros(R, 1, device=dev, dtype=q.dtype)  # mass of tokens above every candidate
    for level in range(levels):
        if vals.shape[1] <= MAX_BOUNDARY:
            break
        hi = vals.max(-1, keepdim=True).values
        if level == 0:   # vals = q >= 0, lo = 0: q * scale lies in [0, N_BUCKETS - 1] (no shift, clamp or padding)
            b = (vals * ((N_BUCKETS - 1) / hi.clamp_min(1e-30))).long()
            mass = torch.zeros(R, N_BUCKETS + 1, device=dev, dtype=q.dtype).scatter_add_(1, b, vals)
        else:
            valid = vals >= 0
            lo = torch.where(valid, vals, 2.0).min(-1, keepdim=True).values
            b = ((vals - lo) * ((N_BUCKETS - 1) / (hi - lo).clamp_min(1e-30))).long().clamp_(0, N_BUCKETS - 1)
            b.masked_fill_(~valid, N_BUCKETS)                                 # padding -> a dump bucket
            mass = torch.zeros(R, N_BUCKETS + 1, device=dev, dtype=q.dtype).scatter_add_(1, b, vals.clamp_min(0))
        mass = mass[:, :N_BUCKETS]
        above = base + mass.flip(-1).cumsum(-1).flip(-1) - mass               # mass in higher buckets
        cross = (above < pp) & (above + mass >= pp)                           # the bucket where p is crossed
        kstar = torch.where(cross, ar, -1).max(-1, keepdim=True).values.clamp_min(0)   # [R, 1]
        if level == 0:
            keep = b > kstar                                                  # (b < N_BUCKETS: always)
        else:
            higher = (b > kstar) & (b < N_BUCKETS)
            hr, hc = higher.nonzero(as_tuple=True)
            keep[hr, cols[hr, hc]] = True
        base = above.gather(1, kstar)
        width = vals.shape[1]
        vals, cols = _compact(b == kstar, vals, cols)
        if vals.shape[1] == width:                      # no progress (tied values): stop refining
            break
    crowded = (vals >= 0).sum(-1) > MAX_BOUNDARY
    if bool(crowded.any()):                             # e.g. many exactly tied values: sort those rows
        keep[crowded] = _top_p_keep_sorted(q[crowded], p[crowded])
        vals = vals.masked_fill(crowded[:, None], -1.0)
        vals, cols = _compact(vals >= 0, vals, cols)
    if vals.shape[1] == 0:
        return keep
    # exact rule for the remaining candidates: mass above = higher buckets + larger candidates
    larger = (vals[:, None, :] > vals[:, :, None]).to(q.dtype)               # [R, M(i), M(j)]: v_j > v_i
    m_above = base + (larger * vals.clamp_min(0)[:, None, :]).sum(-1)
    ok = (vals >= 0) & (m_above < pp)
    r, c = ok.nonzero(as_tuple=True)
    keep[r, cols[r, c]] = True
    return keep


def sample(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
           generators: list[torch.Generator | None], min_p: list[float] | None = None) -> torch.Tensor:
    """logits: [B, V] fp32 -> token ids [B] (long). temperature 0 = greedy (argmax). The filters apply in the
    order top-k, top-p, min-p (a token is kept if its probability is >= min_p x the most likely one's)."""
    B, V = logits.shape
    rows = [i for i in range(B) if temperature[i] > 0]
    if not rows:
        return logits.argmax(-1)
    dev = logits.device
    every = len(rows) == B                                                    # no greedy rows: no gathers
    idx = torch.tensor(rows, device=dev)
    temp = torch.tensor([temperature[i] for i in rows], device=dev, dtype=torch.float32)
    q = torch.softmax((logits if every else logits[idx]) / temp[:, None], dim=-1)   # [R, V]
    ks = [top_k[i] for i in rows]
    if any(0 < k < V for k in ks):
        kmax = min(max(ks), V)
        top = q.topk(kmax, dim=-1).values                                     # [R, kmax], descending
        kk = torch.tensor([min(k, V) if k > 0 else V for k in ks], device=dev)
        kth = top.gather(1, (kk.clamp_max(kmax) - 1)[:, None])
        kth = torch.where((kk >= V)[:, None], torch.zeros_like(kth), kth)
        q = q * (q >= kth)
        q = q / q.sum(-1, keepdim=True)
    ps = torch.tensor([top_p[i] for i in rows], device=dev, dtype=torch.float32)
    if all(top_p[i] < 1 for i in rows):
        q.mul_(top_p_keep(q, ps))
    elif bool((ps < 1).any()):
        pr = (ps < 1).nonzero()[:, 0]
        q[pr] = q[pr] * top_p_keep(q[pr], ps[pr])
    if min_p and any(min_p[i] > 0 for i in rows):
        mp = torch.tensor([min_p[i] for i in rows], device=dev, dtype=q.dtype)
        q = q * (q >= mp[:, None] * q.max(-1, keepdim=True).values)
    cdf = q.cumsum(-1)                                                        # [R, V], unnormalised
    # one uniform per row from that request's own generator (CPU generators: same stream on any device)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(dev)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(V - 1)
    if every:
        return pick[:, 0]
    out = logits.argmax(-1)
    out[idx] = pick[:, 0]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of `tokens` [B] under the unmodified distribution log_softmax(logits [B, V]) -> [B]."""
    return (logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).float()
