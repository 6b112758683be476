"""--cpu-bf16 keeps the LM head in fp32: under torch.autocast("cpu", bfloat16) the CPU twin's fused log-probs
(kernels/logprobs.py: SFT and RL) and the fused DPO head (train/dpo_head.py) give the per-token log-probs and the
head's gradients of a plain fp32 computation (torch.log_softmax of h @ W^T, autograd) on the same inputs, where a
bf16 GEMM output would round logits of size ~20 by up to 0.06 each."""
import torch

from selfreward.kernels.logprobs import linear_logprobs_ref
from selfreward.train.dpo_head import _HeadLoss


def _inputs(n=48, hdim=32, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g) * 2.0
    w = torch.randn(vocab, hdim, generator=g)              # logits of size ~10-30, as a real LM head's
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, t


def _reference(h, w, t):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    lp.sum().backward()
    return lp.detach(), h.grad, w.grad


def test_fused_logprobs_under_autocast_equal_fp32():
    h, w, t = _inputs()
    want, dh_want, dw_want = _reference(h, w, t)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_logprobs_ref(hh, ww, t, chunk=16)
    lp.sum().backward()                                     # outside autocast, as train/loop.py runs it
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hh.grad, dh_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ww.grad, dw_want, rtol=1e-4, atol=1e-4)


def test_dpo_head_sequence_sums_under_autocast_equal_fp32():
    """Two sequences (rows 0..23 and 24..47), one pair; the loss is the sum of the chosen sequence's log-probs, so
    the summed log-probs and the head's gradients are the reference's."""
    h, w, t = _inputs()
    want, _, dw_want = _reference(h[:24], w, t[:24])
    row_seq = torch.tensor([0] * 24 + [1] * 24)
    out_seq = torch.tensor([0, 1])
    fn = lambda lp, sub: (lp[:1], lp[:1].detach(), lp[1:].detach())   # noqa: E731  loss = chosen's log-prob sum
    ww = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, pol, *_ = _HeadLoss.apply(h, ww, t, row_seq, out_seq, fn, 1024)
    total.backward()
    assert abs(float(pol[0]) - float(want.double().sum())) < 1e-3, (float(pol[0]), float(want.sum()))
    torch.testing.assert_close(ww.grad, dw_want, rtol=1e-4, atol=1e-4)
