"""The Triton flash attention with prefix segments (shared-prompt DPO), forward and backward, against the
twin; and the tiny model's shared-prompt DPO log-probs and gradients through the kernels against the
unshared layout. Runs under TRITON_INTERPRET=1 (scripts/test.sh), fp32 (IEEE dots)."""
import torch

import selfreward.kernels.ops as K
from kernel_env import _on_kernels, require_interpreter  # noqa: F401  (autouse fixture)

require_interpreter()


def test_flash_attention_prefix_matches_twin():
    from selfreward.kernels.attention_triton import attention_triton
    g = torch.Generator().manual_seed(0)
    # prompt A (5) read by A1 (3), A2 (4); a plain sequence (6); prompt C (17, two tiles) read by C1, C2
    lens = [5, 3, 4, 6, 17, 2, 19]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, 5], [0, 5], [0, 0], [0, 0], [18, 17], [18, 17]], dtype=torch.int32)
    N, Hq, Hkv, D = sum(lens), 4, 2, 16
    base = [torch.randn(N, h, D, generator=g) for h in (Hq, Hkv, Hkv)]
    dout = torch.randn(N, Hq, D, generator=g)

    def run(fn):
        ts = [t.clone().requires_grad_(True) for t in base]
        o = fn(*ts, cu, max(lens), None, pre)
        o.backward(dout)
        return [o] + [t.grad for t in ts]

    for a, b in zip(run(attention_triton), run(K.attention_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_model_shared_prompt_through_kernels_equals_unshared():
    from selfreward.train.data import Pair, pair_batch
    from selfreward.train.losses import sequence_logps
    from test_train_losses import assert_grads_close, grads, tiny
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()
    p = [1] + r(9)
    pairs = [Pair(p, r(4) + [2], r(6) + [2]), Pair(p, r(2) + [2], r(3) + [2]), Pair([1] + r(3), r(2) + [2], [2])]
    model = tiny(5)
    out = {}
    for share in (False, True):
        lp = sequence_logps(model, pair_batch(pairs, share))
        (lp * torch.arange(1.0, 7.0, dtype=lp.dtype)).sum().backward()
        out[share] = lp.detach(), grads(model)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    assert_grads_close(out[True][1], out[False][1])
