"""The fused head + DPO loss (train/dpo_head.py: the LM head's forward and backward in one pass per group of
pairs) against the unfused path: token_logps through the chunked kernel, autograd through dpo_loss. Every
loss, every reward, every log-prob and every parameter gradient within 1e-5 (fp32), for every loss type, both
layouts, a reply shared by two pairs, groups that fit one chunk and groups split over several (the two-pass
recompute), tied and untied heads, a scaled upstream gradient (the trainer's world / norm)."""
from __future__ import annotations

import pytest
import torch

from selfreward.train.data import pair_batch
from selfreward.train.dpo_head import _groups, pair_head_loss
from selfreward.train.losses import LOSS_TYPES, DPOLossConfig, dpo_loss, sequence_logps
from test_dpo_shared import shared_pairs
from test_train_losses import assert_grads_close, grads, tiny


def _both(policy, pairs, share, cfg, chunk, scale=0.37):
    b = pair_batch(pairs, share)
    with torch.no_grad():   # a reference near the policy: z stays O(1)
        ref = sequence_logps(policy, b) + torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(5),
                                                      dtype=torch.float64)
    ref = None if not cfg.needs_reference else ref
    pol = sequence_logps(policy, b)
    loss, rc, rr = dpo_loss(pol, ref, b.resp_len, cfg)
    (loss.sum() * scale).backward()
    want = (loss.sum().detach(), pol.detach(), loss.detach(), rc, rr), grads(policy)
    fn = lambda lp, sub: dpo_loss(lp, None if ref is None else ref[sub], b.resp_len[sub], cfg)  # noqa: E731
    total, pol2, loss2, rc2, rr2 = pair_head_loss(policy, b, fn, chunk)
    (total * scale).backward()
    return want, ((total.detach(), pol2, loss2, rc2, rr2), grads(policy))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("share,chunk", [(True, 1024), (True, 7), (False, 1024), (False, 5)])
def test_fused_head_equals_unfused_every_loss_and_gradient(loss_type, share, chunk):
    cfg = DPOLossConfig(loss_type, beta=0.5, label_smoothing=0.1 if loss_type in ("cdpo", "robust") else 0.0,
                        nll_alpha=0.3 if loss_type == "sigmoid" else 0.0)
    want, got = _both(tiny(3), shared_pairs(1), share, cfg, chunk)
    for w, g in zip(want[0], got[0]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert_grads_close(got[1], want[1])


def test_fused_head_tied_weights_and_training_mode():
    m = tiny(4, tied=True)
    m.cfg.dropout = 0.0   # dropout on would draw different masks in the two forwards
    want, got = _both(m.train(), shared_pairs(2), True, DPOLossConfig("sigmoid", beta=0.2), 6)
    for w, g in zip(want[0], got[0]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert_grads_close(got[1], want[1])


def test_groups_keep_pairs_that_share_a_reply_together():
    # outputs of 4 pairs (chosen 0..3, rejected 4..7) -> sequences; pairs 0 and 2 share sequence 10
    out_seq = [10, 11, 12, 13, 14, 15, 10, 16]
    rows = {10: 4, 11: 3, 12: 2, 13: 2, 14: 5, 15: 1, 16: 2}
    units = _groups(out_seq, 4, rows, chunk=12)
    assert [sorted(p) for p, _ in units] == [[0, 2], [1, 3]]     # 4 + 5 + 2 = 11 rows, then 3 + 1 + 2 + 2
    assert sorted(units[0][1]) == [10, 12, 14]
    assert [p for p, _ in _groups(out_seq, 4, rows, chunk=3)] == [[0, 2], [1], [3]]   # a group over chunk: alone


def test_out_rows_equal_the_full_forward_and_skip_the_last_block_work():
    """Transformer.forward(out_rows=sel) == forward()[sel] with every gradient, and the last block's query
    and feed-forward matmuls see only the selected rows (its keys and values: every row)."""
    m = tiny(5)
    b = pair_batch(shared_pairs(3), True)
    from selfreward.model.llama import AttnContext
    ctx = AttnContext(b.cu_seqlens, b.max_seqlen, prefix=b.prefix)
    sel = torch.nonzero(b.targets != -100).flatten()
    w = torch.randn(sel.numel(), m.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    want = m(b.tokens, b.positions, ctx)[sel]
    (want * w).sum().backward()
    body = lambda: {n: p.grad.clone() for n, p in m.named_parameters() if not n.startswith("output")}  # noqa: E731
    g_want = body()
    m.zero_grad(set_to_none=True)
    rows_seen = {}
    last = m.layers[-1]
    hooks = [mod.register_forward_hook(lambda mod, a, o, k=k: rows_seen.__setitem__(k, a[0].shape[0]))
             for k, mod in (("wq", last.attention.wq), ("wk", last.attention.wk), ("w1", last.feed_forward.w1))]
    got = m(b.tokens, b.positions, ctx, out_rows=sel)
    for h in hooks:
        h.remove()
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert_grads_close(body(), g_want)
    assert rows_seen == {"wq": sel.numel(), "wk": b.tokens.numel(), "w1": sel.numel()} and sel.numel() < b.tokens.numel()
