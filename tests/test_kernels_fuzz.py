"""Random shapes (hypothesis) for the Triton kernels vs their twins under the interpreter, fp32:
forward and gradients. Few examples each: the interpreter is slow; the fixed-shape tests cover fp16."""
import torch

import selfreward.kernels.ops as K
from kernel_env import _on_kernels, require_interpreter  # noqa: F401  (autouse fixture)

require_interpreter()
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FEW = settings(max_examples=6, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def _grads(fn, inputs):
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ts)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(9)
    out.backward(torch.randn(out.shape, generator=g))
    return [out.detach()] + [t.grad for t in ts]


def _same(fast, ref, inputs):
    for a, b in zip(_grads(fast, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@FEW
@given(rows=st.integers(1, 9), H=st.integers(1, 300), res=st.booleans(), seed=st.integers(0, 99))
def test_rmsnorm_random(rows, H, res, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, r = torch.randn(rows, H, generator=g), torch.randn(H, generator=g), torch.randn(rows, H, generator=g)
    if res:
        _same(lambda x, w, r: K.rmsnorm(x, w, 1e-5, r), lambda x, w, r: K.rmsnorm_ref(x, w, 1e-5, r), [x, w, r])
    else:
        _same(lambda x, w: K.rmsnorm(x, w, 1e-5), lambda x, w: K.rmsnorm_ref(x, w, 1e-5), [x, w])


@FEW
@given(N=st.integers(1, 12), nh=st.integers(1, 6), half=st.integers(1, 70), seed=st.integers(0, 99))
def test_rope_random(N, nh, half, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, nh, 2 * half, generator=g)
    pos = torch.randint(0, 4096, (N,), generator=g)
    cos, sin = K.rope_cos_sin(torch.rand(half, generator=g), pos)
    _same(lambda x: K.rope(x, cos, sin), lambda x: K.rope_ref(x, cos, sin), [x])


@FEW
@given(N=st.integers(1, 3000), seed=st.integers(0, 99))
def test_swiglu_random(N, seed):
    g = torch.Generator().manual_seed(seed)
    _same(K.swiglu, K.swiglu_ref, [3 * torch.randn(N, generator=g), torch.randn(N, generator=g)])


@FEW
@given(N=st.integers(1, 40), H=st.integers(1, 40), V=st.integers(2, 1500), chunk=st.integers(1, 50),
       seed=st.integers(0, 99))
def test_linear_logprobs_random(N, H, V, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.2] = -100
    _same(lambda h, w: K.linear_logprobs(h, w, t, chunk), lambda h, w: K.linear_logprobs_ref(h, w, t, chunk), [h, w])


@FEW
@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=4), hkv=st.integers(1, 2), rep=st.integers(1, 3),
       D=st.sampled_from([16, 32, 48, 64, 80]), seed=st.integers(0, 99))
def test_attention_random(lens, hkv, rep, D, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(N, h, D, generator=g) for h in (hkv * rep, hkv, hkv))
    _same(lambda q, k, v: K.attention(q, k, v, cu, max(lens)), lambda q, k, v: K.attention_ref(q, k, v, cu, max(lens)),
          [q, k, v])
