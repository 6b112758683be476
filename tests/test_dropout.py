"""model/dropout.py against what dropout is: each element zeroed with probability p, independently, the
rest scaled by 1 / (1 - p); gradient = the same mask and scale; replayable from the seed; nothing drawn
again in backward under selective checkpointing."""
import math

import pytest
import torch

from selfreward.model.dropout import dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_independence(p):
    torch.manual_seed(1)
    n = 1 << 20
    keep, p_q = keep_mask(torch.Size([n // 512, 512]), p)
    assert p_q == round(p * 65536) / 65536
    drop = (~keep).double().flatten()
    sd = math.sqrt(p_q * (1 - p_q) / n)
    assert abs(drop.mean().item() - p_q) < 5 * sd                      # the rate
    # neighbours share a 64-bit draw (four 16-bit lanes): they must still be independent
    for lag in (1, 2, 3, 4, 512):
        both = (drop[:-lag] * drop[lag:]).mean().item()
        assert abs(both - p_q * p_q) < 5 * math.sqrt(p_q * p_q * (1 - p_q * p_q) / n), lag
    lanes = drop.view(-1, 4).mean(0)                                      # no lane biased
    assert ((lanes - p_q).abs() < 5 * sd * 2).all(), lanes


def test_values_gradient_and_odd_sizes():
    torch.manual_seed(0)
    for shape in [(3, 5), (7,), (2, 3, 11)]:                              # sizes not a multiple of 4
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(5)
        y = dropout(x, 0.25, True)
        torch.manual_seed(5)
        keep, p_q = keep_mask(x.shape, 0.25)
        want = torch.where(keep, x.detach() / (1 - p_q), torch.zeros_like(x))
        assert torch.equal(y.detach() == 0, ~keep)                         # dropped exactly where drawn
        torch.testing.assert_close(y.detach(), want, rtol=1e-15, atol=0)
        g = torch.randn_like(x)
        (gx,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(gx, torch.where(keep, g / (1 - p_q), torch.zeros_like(g)), rtol=1e-15, atol=0)


def test_identity_off_and_unbiased_mean():
    x = torch.randn(64, 64)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(3)
    big = torch.ones(1 << 20)
    m = dropout(big, 0.1, True).double().mean().item()                   # E = 1 exactly (p rounded, scale matched)
    assert abs(m - 1.0) < 5 * math.sqrt(0.1 / 0.9 / (1 << 20))


def test_seeded_replay_and_fresh_masks():
    x = torch.randn(128, 64)
    torch.manual_seed(11)
    a, b = dropout(x, 0.1, True), dropout(x, 0.1, True)
    torch.manual_seed(11)
    assert torch.equal(dropout(x, 0.1, True), a)                         # the default generator governs it
    assert not torch.equal(a, b)                                         # and each call draws afresh


def test_selective_checkpointing_draws_once():
    """Backward under selective checkpointing draws no random bits (they are kept); full checkpointing
    draws them again (replayed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from selfreward.train.data import pair_batch
    from selfreward.train.losses import sequence_logps
    from selfreward.train.parallel import apply_checkpointing
    from test_dpo_shared import shared_pairs, tiny

    class CountRandom(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountRandom.n += func.__name__.split(".")[0] in ("randint", "random_", "bernoulli_", "native_dropout")
            return func(*args, **(kwargs or {}))

    counts = {}
    for mode, selective in (("selective", True), ("full", False)):
        m = tiny(6)
        m.cfg.dropout = 0.1
        m.train()
        apply_checkpointing(m, selective)
        torch.manual_seed(0)
        lp = sequence_logps(m, pair_batch(shared_pairs(3)))
        CountRandom.n = 0
        with CountRandom():
            lp.sum().backward()
        counts[mode] = CountRandom.n
    assert counts["selective"] == 0
    assert counts["full"] > 0
