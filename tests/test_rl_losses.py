"""train/losses.py's RL estimators and train/rollout.py's log-probs against a plain-PyTorch twin on hand-built rollouts
(one sequence at a time, full logits, Python loops over tokens), losses and every gradient; the KL term
and the returns against numbers worked by hand."""
from __future__ import annotations

import pytest
import torch

from hf_tiny import make_hf_checkpoint

T = 0.9
BETA = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from selfreward.model.checkpoint import load_model
    d = tmp_path_factory.mktemp("rl_losses")
    pol = load_model(make_hf_checkpoint(d / "pol", "llama_tied", seed=0, vocab=64, hidden=32, layers=2,
                                        heads=2, kv_heads=1, intermediate=48))
    ref = load_model(make_hf_checkpoint(d / "ref", "llama_tied", seed=1, vocab=64, hidden=32, layers=2,
                                        heads=2, kv_heads=1, intermediate=48)).eval().requires_grad_(False)
    return pol, ref


def rollouts():
    """Two prompts x two responses of different lengths (one of a single token)."""
    from selfreward.train.rollout import Rollout
    spec = [([1, 5, 9, 3], [7, 8, 2], 0, 1.0), ([1, 5, 9, 3], [11], 0, -0.5),
            ([1, 4, 6], [12, 13, 14, 2], 1, 0.25), ([1, 4, 6], [20, 21], 1, 0.75)]
    return [Rollout("", p, r, "", g, "stop", reward) for p, r, g, reward in spec]


def twin_logps(model, p: list[int], r: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the model, full logits / T, log_softmax, gather -> ([len r], hidden [len r, H])."""
    from selfreward.model.llama import AttnContext
    ids = torch.tensor(p + r[:-1])
    n = len(ids)
    h = model(ids, torch.arange(n), AttnContext(torch.tensor([0, n], dtype=torch.int32), n))   # [n, H]
    h = h[len(p) - 1:]                                                                          # [len r, H]
    lp = torch.log_softmax((h @ model.lm_head_weight.T) / T, -1)
    return lp[torch.arange(len(r)), torch.tensor(r)], h


def twin_loss(pol, ref, head, rolls, estimator: str) -> torch.Tensor:
    per = []
    for ro in rolls:
        lp, h = twin_logps(pol, ro.prompt_ids, ro.response_ids)
        with torch.no_grad():
            rlp, _ = twin_logps(ref, ro.prompt_ids, ro.response_ids)
        v = head(h.detach()).squeeze(-1)
        kl = [float(a) - float(b) for a, b in zip(lp.detach(), rlp)]
        G = [ro.reward - BETA * sum(kl[t:]) for t in range(len(kl))]
        per.append((lp, v, kl, G, ro))
    loss = torch.zeros((), dtype=torch.float64)
    for i, (lp, v, kl, G, ro) in enumerate(per):
        if estimator == "reinforce":
            adv = [G[t] - float(v[t].detach()) for t in range(len(G))]
        else:
            pen = lambda x: x[4].reward - BETA * sum(x[2])  # noqa: E731
            others = [pen(x) for j, x in enumerate(per) if j != i and x[4].group == ro.group]
            adv = [pen(per[i]) - sum(others) / len(others)] * len(G)
        for t in range(len(G)):
            loss = loss - lp[t].double() * adv[t] + 0.5 * (v[t].double() - G[t]) ** 2
    return loss


@pytest.mark.parametrize("estimator", ["reinforce", "rloo"])
def test_loss_and_gradients_equal_the_twin(models, estimator):
    from selfreward.train.losses import reinforce_loss, rloo_loss
    from selfreward.train.rollout import flat_batch, response_logps
    pol, ref = models
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1)                 # random, so the baseline is not zero
    rolls = rollouts()

    def ours():
        b = flat_batch(rolls)
        lp, h = response_logps(pol, b, T)
        with torch.no_grad():
            rlp, _ = response_logps(ref, b, T)
        fn = reinforce_loss if estimator == "reinforce" else rloo_loss
        return fn(lp, head(h.detach()).squeeze(-1), rlp, b.seq, b.rewards, b.group, BETA).loss

    params = list(pol.parameters()) + list(head.parameters())
    a = ours()
    ga = torch.autograd.grad(a, params)
    b = twin_loss(pol, ref, head, rolls, estimator)
    gb = torch.autograd.grad(b, params)
    assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item()))
    for x, y in zip(ga, gb):
        assert (x - y).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item())
    assert any(g.abs().sum() > 0 for g in ga[:-2]) and ga[-2].abs().sum() > 0   # policy and head both learn


def test_kl_term_and_returns_by_hand():
    from selfreward.train.losses import kl_per_token, reinforce_loss, returns_to_go, rloo_loss
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5])
    seq, rewards = torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0])
    kl = kl_per_token(logp, ref)
    assert kl.tolist() == [0.5, -1.0, 0.0]
    # response 0: G_0 = 1 - 0.05 (0.5 - 1.0) = 1.025, G_1 = 1 - 0.05 (-1.0) = 1.05; response 1: 0
    G = returns_to_go(kl, seq, rewards, 0.05)
    assert torch.allclose(G, torch.tensor([1.025, 1.05, 0.0], dtype=torch.float64))
    v = torch.tensor([0.5, 0.25, -0.25], requires_grad=True)
    o = reinforce_loss(logp, v, ref, seq, rewards, None, 0.05, value_coef=1.0)
    # A = G - V = [0.525, 0.8, 0.25]; pg = -(-1 x 0.525 - 2 x 0.8 - 0.5 x 0.25) = 2.25;
    # value = 0.5 (0.525^2 + 0.8^2 + 0.25^2)
    assert abs(o.pg.item() - 2.25) < 1e-9 and abs(o.value.item() - 0.5 * (0.525 ** 2 + 0.8 ** 2 + 0.0625)) < 1e-9
    o.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([-0.525, -0.8, -0.25]))          # d/dlogp = -A, not through KL
    # RLOO, one prompt: penalised R' = [1 - 0.05 (-0.5), 0] = [1.025, 0] -> A = [1.025, -1.025]
    o = rloo_loss(logp.detach(), v, ref, seq, rewards, torch.tensor([0, 0]), 0.05)
    assert torch.allclose(o.advantages, torch.tensor([1.025, 1.025, -1.025], dtype=torch.float64))
    assert abs(o.pg.item() - (1.025 + 2.05 - 0.5125)) < 1e-9
    with pytest.raises(ValueError, match="at least 2 responses"):
        rloo_loss(logp, v, ref, seq, rewards, torch.tensor([0, 1]), 0.05)
