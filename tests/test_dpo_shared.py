"""Shared-prompt DPO (train.data.pair_batch share_prompt=True): the prompt computed once for all the
replies that share it. Checked against the unshared layout (every reply with its own copy of the prompt,
plain causal attention) and the naive twin: summed log-probs, every DPO loss and every parameter gradient
within 1e-5 (fp32, the attention twin on CPU; the Triton kernel is held to the twin in
tests/test_kernels_prefix.py)."""
from __future__ import annotations

import pytest
import torch

import selfreward.kernels.ops as K
from selfreward.kernels.attention import prefix_dependents
from selfreward.train.data import Pair, pair_batch
from selfreward.train.losses import LOSS_TYPES, DPOLossConfig, compute_reference, dpo_loss, sequence_logps
from test_train_losses import V, assert_grads_close, grads, naive_sequence_logps, tiny


def shared_pairs(seed: int = 0) -> list[Pair]:
    """N candidates of one prompt (3 pairs), a reply repeated across pairs, a BOS-only prompt, plain pairs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
    p1, p2 = [1] + r(11), [1] + r(6)
    a = r(5) + [2]
    return [Pair(p1, a, r(7) + [2]), Pair(p2, r(3) + [2], r(1) + [2]), Pair(p1, r(9) + [2], a),
            Pair([1], r(4) + [2], r(2) + [2]), Pair(p1, r(2) + [2], r(6) + [2]), Pair(p2, [2], r(8) + [2])]


def test_layout_holds_each_prompt_once():
    pairs = shared_pairs()
    sh, un = pair_batch(pairs, True), pair_batch(pairs, False)
    # prompts p1 (12 tokens) and p2 (7): 11 + 6 prompt tokens once; each distinct reply r with len(r) tokens
    replies = {(tuple(p.prompt), tuple(x)) for p in pairs for x in (p.chosen, p.rejected)}
    assert sh.tokens.numel() == 11 + 6 + sum(len(x) for _, x in replies)
    assert un.tokens.numel() == sum(len(p.prompt) + len(x) - 1 for p in pairs for x in (p.chosen, p.rejected))
    assert len(replies) == 11                          # reply `a` of p1 appears twice, computed once
    assert torch.equal(sh.resp_len, un.resp_len)
    assert int((sh.targets != -100).sum()) == sum(len(x) for _, x in replies)
    # a reply's positions continue from its prompt: the first reply of p1 starts at position 11
    s = int(sh.out_seq[0])
    assert sh.positions[sh.seq_id == s].tolist() == list(range(11, 11 + len(pairs[0].chosen)))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_shared_equals_unshared_loss_and_every_gradient(loss_type):
    policy, pairs = tiny(3), shared_pairs(1)
    with torch.no_grad():   # a reference near the policy (as after a few steps): z stays O(1), as in training
        ref = sequence_logps(policy, pair_batch(pairs, False)) + \
            torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cfg = DPOLossConfig(loss_type, beta=0.5, label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0)
    out = {}
    for share in (False, True):
        b = pair_batch(pairs, share)
        lp = sequence_logps(policy, b)
        loss = dpo_loss(lp, ref, b.resp_len, cfg)[0]
        loss.sum().backward()
        out[share] = (lp.detach(), loss.detach(), grads(policy))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-5)
    assert_grads_close(out[True][2], out[False][2])
    with torch.no_grad():   # and both agree with the naive twin (full logits, padded batches)
        torch.testing.assert_close(out[True][0], naive_sequence_logps(policy, pairs), rtol=0, atol=1e-4)


def test_reference_cache_values_shared_equal_unshared():
    model, pairs = tiny(4), shared_pairs(2)
    a = compute_reference(model, pairs, list(range(len(pairs))), 4, share_prompt=True)
    b = compute_reference(model, pairs, list(range(len(pairs))), 4, share_prompt=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_attention_twin_prefix_equals_concatenated_causal():
    """Each reply with a prefix == the reply appended to its prompt in one causal sequence."""
    g = torch.Generator().manual_seed(0)
    P, R1, R2, Hq, Hkv, D = 7, 4, 9, 4, 2, 8
    q, k, v = (torch.randn(P + R1 + R2, h, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, P, P + R1, P + R1 + R2], dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, P], [0, P]], dtype=torch.int32)
    o = K.attention_ref(q, k, v, cu, None, None, pre)
    dout = torch.randn(o.shape, generator=g)
    (o * dout).sum().backward()
    got = [o.detach(), q.grad, k.grad, v.grad]
    # unshared: [prompt + reply1] and [prompt + reply2] as two plain causal sequences
    idx = torch.cat([torch.arange(P + R1), torch.arange(P), torch.arange(P + R1, P + R1 + R2)])
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o2 = K.attention_ref(q2[idx], k2[idx], v2[idx], torch.tensor([0, P + R1, 2 * P + R1 + R2], dtype=torch.int32))
    # the prompt's own outputs once (first copy); its gradients sum over both copies
    keep = torch.cat([torch.arange(P + R1), torch.arange(P + R1 + P, 2 * P + R1 + R2)])
    (o2[keep] * dout).sum().backward()
    want = [o2[keep].detach(), q2.grad, k2.grad, v2.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_layout_is_checked():
    cu = torch.tensor([0, 3, 5, 6, 8], dtype=torch.int32)
    ok = torch.tensor([[0, 0], [0, 3], [0, 3], [0, 0]], dtype=torch.int32)
    assert prefix_dependents(cu, ok).tolist() == [[3, 6], [0, 0], [0, 0], [0, 0]]
    with pytest.raises(ValueError, match="not adjacent"):   # the readers of one prefix must be neighbours
        prefix_dependents(cu, torch.tensor([[0, 0], [0, 3], [0, 0], [0, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="not a whole"):
        prefix_dependents(cu, torch.tensor([[0, 0], [0, 2], [0, 0], [0, 0]], dtype=torch.int32))


def _loss_grads_and_backward_mms(model, pairs):
    """(loss, gradients, aten.mm calls during backward) of one shared-prompt DPO forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMM.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)                      # dropout on: the recompute must replay the same masks
    lp = sequence_logps(model, pair_batch(pairs))
    with CountMM():
        lp.sum().backward()
    return lp.detach(), grads(model), CountMM.n


def test_selective_checkpointing_same_gradients_no_matmul_recompute():
    from selfreward.train.parallel import apply_checkpointing
    pairs = shared_pairs(3)
    runs = {}
    for mode in ("none", "selective", "full"):
        m = tiny(6)
        m.cfg.dropout = 0.1
        m.train()
        if mode != "none":
            apply_checkpointing(m, selective=mode == "selective")
        runs[mode] = _loss_grads_and_backward_mms(m, pairs)
    for mode in ("selective", "full"):
        torch.testing.assert_close(runs[mode][0], runs["none"][0], rtol=0, atol=1e-5)
        assert_grads_close(runs[mode][1], runs["none"][1])
    # 7 linears per block x 2 blocks: full checkpointing runs their forward matmuls again in backward,
    # selective keeps those outputs and runs only the gradient matmuls, as no checkpointing does
    assert runs["selective"][2] == runs["none"][2]
    assert runs["full"][2] == runs["none"][2] + 14
