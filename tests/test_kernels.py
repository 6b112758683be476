"""Triton kernels (run by the Triton interpreter on CPU) against their plain-PyTorch twins:
RMSNorm (+ residual), SwiGLU, RoPE, fused linear log-probs. Forward and every gradient, odd shapes,
fp32 and fp16.

Triton reads TRITON_INTERPRET when `triton.language` is imported (its own helpers such as tl.sum are
@jit functions) and `kernels.use_triton` reads it at every call, so these files run in their own pytest
process with TRITON_INTERPRET=1 set from the start (scripts/test.sh does this); the rest of the suite
stays on the twins.
"""
import pytest
import torch

import selfreward.kernels.ops as K
from kernel_env import _on_kernels, require_interpreter  # noqa: F401  (autouse fixture)

require_interpreter()


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
ALL = [torch.float32, torch.float16, torch.bfloat16]   # bf16 only where the kernel has no tl.dot


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check(fn_tri, fn_ref, inputs, dtype, grad_out=None):
    """Forward and every input gradient of fn_tri vs fn_ref (inputs: list of tensors, all differentiable)."""
    a = [_leaf(t) for t in inputs]
    b = [_leaf(t) for t in inputs]
    out_t, out_r = fn_tri(*a), fn_ref(*b)
    outs_t = out_t if isinstance(out_t, tuple) else (out_t,)
    outs_r = out_r if isinstance(out_r, tuple) else (out_r,)
    g = torch.Generator().manual_seed(1)
    loss_t, loss_r = 0, 0
    for ot, orf in zip(outs_t, outs_r):
        assert ot.dtype == orf.dtype and ot.shape == orf.shape
        torch.testing.assert_close(ot, orf, **TOL[dtype])
        w = torch.randn(orf.shape, generator=g).to(orf.dtype)
        loss_t = loss_t + (ot * w).float().sum()
        loss_r = loss_r + (orf * w).float().sum()
    loss_t.backward()
    loss_r.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(7, 37), (3, 5, 64), (1, 130)])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm(dtype, shape, residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    if residual:
        r = torch.randn(shape, generator=g).to(dtype)
        _check(lambda x, w, r: K.rmsnorm(x, w, 1e-5, r), lambda x, w, r: K.rmsnorm_ref(x, w, 1e-5, r),
               [x, w, r], dtype)
    else:
        _check(lambda x, w: K.rmsnorm(x, w, 1e-6), lambda x, w: K.rmsnorm_ref(x, w, 1e-6), [x, w], dtype)


def test_rmsnorm_fp32_weight_fp16_input():   # the model keeps norm weights fp32 under autocast-free fp16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 48, generator=g).half()
    w = torch.randn(48, generator=g)
    _check(lambda x, w: K.rmsnorm(x, w, 1e-5), lambda x, w: K.rmsnorm_ref(x, w, 1e-5), [x, w], torch.float16)


def test_switch_really_runs_triton(monkeypatch):
    """Guard against a test that cannot fail: under the fixture the dispatch must reach the Triton module."""
    import selfreward.kernels.swiglu_triton as st
    calls = []
    orig = st.swiglu_triton
    monkeypatch.setattr(st, "swiglu_triton", lambda *a: calls.append(1) or orig(*a))
    K.swiglu(torch.randn(3, 5), torch.randn(3, 5))
    assert calls and K.use_triton(torch.zeros(1))
    monkeypatch.setenv("SRLM_KERNELS", "ref")
    assert not K.use_triton(torch.zeros(1))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("SRLM_KERNELS", "auto")
    assert not K.use_triton(torch.zeros(1))
    monkeypatch.setenv("SRLM_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.use_triton(torch.zeros(1))


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(5, 11), (3, 7, 173), (2100,)])
def test_swiglu(dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate = (2 * torch.randn(shape, generator=g)).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    _check(K.swiglu, K.swiglu_ref, [gate, up], dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("N,nh,D", [(9, 3, 16), (5, 2, 64), (4, 5, 128), (3, 1, 6)])
def test_rope(dtype, N, nh, D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, nh, D, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 2, 0, 1, 5, 6, 0, 3][:N])        # restarts, as in packed rows
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = K.rope_cos_sin(inv, pos)
    _check(lambda x: K.rope(x, cos, sin), lambda x: K.rope_ref(x, cos, sin), [x], dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("N,H,V,chunk", [(37, 24, 1000, 16), (9, 64, 130, 1024), (20, 33, 2051, 7)])
def test_linear_logprobs(dtype, N, H, V, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100                                              # ignore_index rows
    _check(lambda h, w: K.linear_logprobs(h, w, t, chunk=chunk),
           lambda h, w: K.linear_logprobs_ref(h, w, t, chunk=chunk), [h, w], dtype)


def test_linear_logprobs_matches_naive():
    """The twin itself against the unchunked formula, and ignored rows are exactly 0 with no gradient."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (11,), generator=g)
    t[3] = -100
    got = K.linear_logprobs(h, w, t, chunk=4)
    naive = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp_min(0)[:, None])[:, 0]
    naive = torch.where(t != -100, naive, 0.0)
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert got[3].item() == 0.0 and h.grad[3].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="outside"):
        K.linear_logprobs(h.detach(), w, torch.full((11,), 50))


def test_linear_logprobs_memory_vs_naive(monkeypatch):
    """The chunked log-prob forward+backward peaks at <= 25% of the naive one (fresh processes, peak RSS;
    `python benchmarks/bench_kernels.py --memory` gives the full-size figure)."""
    from bench_kernels import measure_memory
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = measure_memory(N=4096, V=6000, H=64, chunk=256, variants=("naive", "twin"))
    naive, twin = res["naive"]["peak_delta_mib"], res["twin"]["peak_delta_mib"]
    assert naive > 250                       # the [N, V] logits and their copies really were allocated
    assert abs(res["naive"]["logp_sum"] - res["twin"]["logp_sum"]) < 1e-3 * abs(res["naive"]["logp_sum"])
    assert twin <= 0.25 * naive, (twin, naive)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_logprobs_cross_entropy_matches_torch(reduction):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(19, 24, generator=g, requires_grad=True)
    w = torch.randn(301, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 301, (19,), generator=g)
    t[[2, 7]] = -100
    nll = -K.linear_logprobs(h, w, t, chunk=8)            # cross-entropy is -logp, averaged over kept targets
    got = {"none": nll, "sum": nll.sum(), "mean": nll.sum() / (t != -100).sum()}[reduction]
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h2 @ w2.T, t, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
