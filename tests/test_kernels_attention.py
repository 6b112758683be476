"""Triton flash attention (forward + backward), paged KV store / decode / prefill, and the whole model
through the kernels, all under the Triton interpreter against the plain-PyTorch twins.
Runs in its own pytest process with TRITON_INTERPRET=1 (see tests/test_kernels.py and scripts/test.sh).
"""
import pytest
import torch

import selfreward.kernels.ops as K
from kernel_env import _on_kernels, require_interpreter  # noqa: F401  (autouse fixture)

require_interpreter()


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("D,Hq,Hkv,lens", [(64, 4, 2, [5, 17, 1, 9]), (128, 3, 1, [23, 2]), (64, 2, 2, [33]),
                                          (40, 4, 1, [6, 11])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention(D, Hq, Hkv, lens, dtype):
    g = torch.Generator().manual_seed(D + len(lens))
    N, cu = sum(lens), _cu(lens)
    base = [torch.randn(N, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv)]
    dout = torch.randn(N, Hq, D, generator=g).to(dtype)

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        o = fn(*ts, cu, max(lens))
        o.backward(dout.to(o.dtype))
        return [o] + [t.grad for t in ts]

    tri = run(K.attention, base)
    twin = run(K.attention_ref, base)
    if dtype == torch.float32:
        for a, b in zip(tri, twin):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    else:   # fp16: the kernel may be no further from the fp32 truth than the fp16 twin is (plus a little)
        exact = run(K.attention_ref, [t.float() for t in base])
        for a, b, e in zip(tri, twin, exact):
            assert a.dtype == torch.float16
            assert _err(a, e) <= 2 * _err(b, e) + 2e-3, (_err(a, e), _err(b, e))


def test_attention_never_crosses_sequences():
    """Changing one sequence's keys must leave the other sequences' outputs bit-identical."""
    g = torch.Generator().manual_seed(5)
    cu = _cu([4, 7])
    q, k, v = (torch.randn(11, 2, 16, generator=g) for _ in range(3))
    o1 = K.attention(q, k, v, cu, 7)
    k2 = k.clone()
    k2[4:] += 1.0
    o2 = K.attention(q, k2, v, cu, 7)
    assert torch.equal(o1[:4], o2[:4]) and not torch.equal(o1[4:], o2[4:])


def _paged_setup(dtype, Hkv, D, bs=5, ctx=(7, 13, 1), seed=0):
    """Caches with shuffled block tables, filled through store_kv (with one -1 padding slot)."""
    g = torch.Generator().manual_seed(seed)
    S, nb = len(ctx), 14
    perm = torch.randperm(nb, generator=g)
    need = [(c + bs - 1) // bs for c in ctx]
    bt = torch.full((S, max(need) + 1), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[used:used + n]
        used += n
    slots = torch.cat([bt[s, torch.arange(c) // bs].long() * bs + torch.arange(c) % bs for s, c in enumerate(ctx)])
    slots = torch.cat([slots[:3], torch.tensor([-1]), slots[3:]])
    k = torch.randn(len(slots), Hkv, D, generator=g).to(dtype)
    v = torch.randn(len(slots), Hkv, D, generator=g).to(dtype)
    return k, v, slots, bt, torch.tensor(ctx, dtype=torch.int32), nb, bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(6, 2, 64), (4, 4, 128), (8, 1, 24)])
def test_paged_store_decode_prefill(dtype, Hq, Hkv, D):
    k, v, slots, bt, ctx, nb, bs = _paged_setup(dtype, Hkv, D)
    kc = torch.full((nb, bs, Hkv, D), 7.0, dtype=dtype)       # junk in unused slots must never be read
    vc = kc.clone()
    kc2, vc2 = kc.clone(), vc.clone()
    K.store_kv(k, v, kc, vc, slots)
    K.store_kv_ref(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    g = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    q = torch.randn(3, Hq, D, generator=g).to(dtype)
    torch.testing.assert_close(K.paged_decode(q, kc, vc, bt, ctx), K.paged_decode_ref(q, kc, vc, bt, ctx), **tol)
    cu = _cu([3, 9, 1])                                         # prefill: the newest qlen tokens of each
    q = torch.randn(13, Hq, D, generator=g).to(dtype)
    torch.testing.assert_close(K.paged_prefill(q, kc, vc, cu, bt, ctx),
                               K.paged_prefill_ref(q, kc, vc, cu, bt, ctx), **tol)


def _tiny_model(seed=0):
    from selfreward.model.config import ModelConfig
    from selfreward.model.llama import Transformer
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    m = Transformer(cfg)
    m.init_weights(std=0.1, seed=seed)
    with torch.no_grad():   # non-trivial norm weights
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return m


def test_model_logits_and_grads_match_twins(monkeypatch):
    """Forward logits and every parameter gradient of a packed batch, kernels vs twins."""
    m = _tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 13), generator=g)
    pos = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])   # two packed examples in row 0
    tgt = torch.randint(0, 97, (26,), generator=g)
    tgt[5] = -100

    def run():
        m.zero_grad()
        h = m.forward_packed(ids, pos).reshape(26, -1)
        logits = m.logits(h)
        K.linear_logprobs(h, m.lm_head_weight, tgt, chunk=8).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    from selfreward.kernels.attention_triton import _FlashAttn
    calls = []
    monkeypatch.setattr(_FlashAttn, "apply", lambda *a, _f=_FlashAttn.apply: calls.append(1) or _f(*a))
    lt, gt = run()
    assert calls, "the Triton attention was not used"
    monkeypatch.setenv("SRLM_KERNELS", "ref")
    lr, gr = run()
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-5)
    for n in gr:
        torch.testing.assert_close(gt[n], gr[n], rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


def test_model_paged_decode_matches_full_forward():
    """Prefill a prompt into the paged cache, decode two tokens: logits equal a full no-cache forward."""
    from selfreward.model.llama import AttnContext
    m = _tiny_model(seed=1).eval()
    cfg = m.cfg
    bs, nb = 4, 6
    caches = [(torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim),
               torch.zeros(nb, bs, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    bt = torch.tensor([[4, 1, 5, 0]], dtype=torch.int32)
    seq = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(2))
    P = 7

    def slots(lo, hi):
        t = torch.arange(lo, hi)
        return bt[0, t // bs].long() * bs + t % bs

    with torch.no_grad():
        full = m.logits(m(seq, torch.arange(9), AttnContext(_cu([9]), 9)))
        ctx = AttnContext(_cu([P]), P, kv_caches=caches, slot_mapping=slots(0, P), block_tables=bt,
                          context_lens=torch.tensor([P], dtype=torch.int32))
        got = [m.logits(m(seq[:P], torch.arange(P), ctx))]
        for i in (P, P + 1):
            ctx = AttnContext(_cu([1]), 1, kv_caches=caches, slot_mapping=slots(i, i + 1), block_tables=bt,
                              context_lens=torch.tensor([i + 1], dtype=torch.int32), decode=True)
            got.append(m.logits(m(seq[i:i + 1], torch.tensor([i]), ctx)))
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 3])
def test_paged_split_k_matches_twin(splits):
    """Flash-decoding splits merge to the unsplit result: the 40-token context spans every split (CPU key
    tiles are 16 wide), the shorter ones leave later splits empty."""
    from selfreward.kernels.paged_triton import paged_decode_triton, paged_prefill_triton
    k, v, slots, bt, ctx, nb, bs = _paged_setup(torch.float32, 2, 32, bs=4, ctx=(7, 40, 1), seed=3)
    kc = torch.zeros(nb, bs, 2, 32)
    vc = torch.zeros_like(kc)
    K.store_kv_ref(k, v, kc, vc, slots)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 6, 32, generator=g)
    torch.testing.assert_close(paged_decode_triton(q, kc, vc, bt, ctx, num_splits=splits),
                               K.paged_decode_ref(q, kc, vc, bt, ctx), rtol=1e-5, atol=1e-5)
    cu = _cu([3, 9, 1])
    q = torch.randn(13, 6, 32, generator=g)
    torch.testing.assert_close(paged_prefill_triton(q, kc, vc, cu, bt, ctx, num_splits=splits),
                               K.paged_prefill_ref(q, kc, vc, cu, bt, ctx), rtol=1e-5, atol=1e-5)
