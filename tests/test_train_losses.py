"""The fused one-pass DPO loss against the naive twin (full logits, separate passes), loss variants against
hand-computed values, SFT cross-entropy against torch's, and the reference cache key."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfreward.cli import ConfigError
from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer
from selfreward.train.data import IGNORE, Pair, pack_rows, Example
from selfreward.train.losses import (LOSS_TYPES, DPOLossConfig, ReferenceCache, compute_reference, dpo_loss,
                          pair_batch, sequence_logps, sft_logp_sum, weights_hash)

V = 97


def tiny(seed: int, tied: bool = False) -> Transformer:
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    m = Transformer(cfg)
    m.init_weights(std=0.2, seed=seed)
    with torch.no_grad():   # norms away from 1 so a mix-up shows
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.1)
    return m


def random_pairs(n: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(3, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [Pair([1] + r(2, 9), r(1, 8) + [2], r(1, 11) + [2]) for _ in range(n)]


def naive_sequence_logps(model, pairs: list[Pair]) -> torch.Tensor:
    """The plain twin: chosen and rejected as two separate right-padded batches through
    Transformer.forward_batch, full [B, T, V] logits, log_softmax, gather. -> [2B] (chosen first)."""
    out = []
    for which in ("chosen", "rejected"):
        seqs = [p.prompt + getattr(p, which) for p in pairs]
        T = max(map(len, seqs))
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        resp = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, (p, s) in enumerate(zip(pairs, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            resp[i, len(p.prompt):len(s)] = True
        logits = model.forward_batch(ids, attn)                          # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)             # predicts tokens 1..T-1
        picked = logp.gather(-1, ids[:, 1:, None])[..., 0]               # [B, T-1]
        out.append((picked.double() * resp[:, 1:]).sum(-1))
    return torch.cat(out)


def assert_grads_close(got: dict, want: dict) -> None:
    """Every gradient within 1e-5, absolute, or relative to the tensor's largest entry when that exceeds 1
    (fp32 resolves ~1e-7 of a value: gradients of ~10 cannot agree to 1e-5 absolute)."""
    for n, w in want.items():
        err = (got[n] - w).abs().max().item()
        assert err <= 1e-5 * max(1.0, w.abs().max().item()), f"{n}: max |diff| {err:.3g}"


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_fused_dpo_equals_naive_loss_and_every_gradient(tied):
    # the reference is the policy moved a little (as after some DPO steps): z stays O(1), as in training
    policy, ref = tiny(0, tied), tiny(0, tied)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    pairs = random_pairs(5)
    b = pair_batch(pairs)
    pol = sequence_logps(policy, b)                          # one forward over the 2B sequences
    with torch.no_grad():
        r = sequence_logps(ref, b)
        r_n = naive_sequence_logps(ref, pairs)
    pol_n = naive_sequence_logps(policy, pairs)              # full logits, chosen and rejected apart
    torch.testing.assert_close(r, r_n, atol=1e-5, rtol=1e-5)
    # the precomputed table (what the cache stores), in batches of 2 pairs
    table = compute_reference(ref, pairs, list(range(len(pairs))), batch_pairs=2)     # [B, 2]
    cached = torch.cat([table[:, 0], table[:, 1]])
    for loss_type in LOSS_TYPES:
        cfg = DPOLossConfig(loss_type, beta=1.0)
        loss_n = dpo_loss(pol_n, r_n, b.resp_len, cfg)[0].mean()
        loss_n.backward(retain_graph=True)
        g_naive = grads(policy)
        assert max(g.abs().max().item() for g in g_naive.values()) > 1e-4   # not all zero
        for ref_lp in (r, cached):
            loss_f = dpo_loss(pol, ref_lp, b.resp_len, cfg)[0].mean()
            loss_f.backward(retain_graph=True)
            assert abs(loss_f.item() - loss_n.item()) <= 1e-5, loss_type
            assert_grads_close(grads(policy), g_naive)


def test_loss_variants_against_hand_computed_values():
    # one pair: policy (chosen, rejected) log-probs, reference ones, response lengths
    pc, pr, rc, rr, lc, lr = -10.0, -14.0, -11.0, -13.0, 4, 8
    policy, ref = torch.tensor([pc, pr]), torch.tensor([rc, rr])
    lens = torch.tensor([lc, lr])
    beta = 0.5
    z = (pc - rc) - (pr - rr)                                       # 1 - (-1) = 2
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = {
        "sigmoid": -math.log(sig(beta * z)),
        "ipo": ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2,
        "cdpo": -0.8 * math.log(sig(beta * z)) - 0.2 * math.log(sig(-beta * z)),
        "robust": (-0.8 * math.log(sig(beta * z)) + 0.2 * math.log(sig(-beta * z))) / (1 - 2 * 0.2),
        "simpo": -math.log(sig(beta * (pc / lc - pr / lr) - 0.25)),
    }
    eps = lambda t: 0.2 if t in ("cdpo", "robust") else 0.0  # noqa: E731
    for t, w in want.items():
        loss, rch, rrej = dpo_loss(policy, ref, lens, DPOLossConfig(t, beta, label_smoothing=eps(t), simpo_gamma=0.25))
        assert abs(loss.item() - w) < 1e-6, t
        if t == "simpo":
            assert abs(rch.item() - beta * pc / lc) < 1e-6 and abs(rrej.item() - beta * pr / lr) < 1e-6
        else:
            assert abs(rch.item() - beta * (pc - rc)) < 1e-6 and abs(rrej.item() - beta * (pr - rr)) < 1e-6
        # the RPO term: + alpha * (chosen NLL per token) = 0.7 * 10 / 4, rewards unchanged
        cfg = DPOLossConfig(t, beta, label_smoothing=eps(t), simpo_gamma=0.25, nll_alpha=0.7)
        loss2, rch2, rrej2 = dpo_loss(policy, ref, lens, cfg)
        assert abs(loss2.item() - (w + 0.7 * -pc / lc)) < 1e-6, t
        assert rch2.item() == rch.item() and rrej2.item() == rrej.item()
    with pytest.raises(ValueError, match="loss type"):
        DPOLossConfig("kto")


def test_cdpo_and_robust_against_their_papers():
    """Issue 13 item 6. beta z = 1, eps = 0.2, with log sigmoid(1) = -0.31326169, log sigmoid(-1) = -1.31326169:
    cDPO (Mitchell 2023): 0.8 * 0.31326169 + 0.2 * 1.31326169 = 0.51326169;
    rDPO (Chowdhury et al. 2024, eq. 6 / TRL robust): (0.8 * 0.31326169 - 0.2 * 1.31326169) / 0.6 = -0.02007164."""
    policy, ref, lens = torch.tensor([-10.0, -14.0]), torch.tensor([-11.0, -13.0]), torch.tensor([4, 8])   # z = 2
    for t, want in (("cdpo", 0.51326169), ("robust", -0.02007164)):
        loss = dpo_loss(policy, ref, lens, DPOLossConfig(t, 0.5, label_smoothing=0.2))[0]
        assert loss.item() == pytest.approx(want, abs=1e-7), t
    # rDPO's defining property: unbiased under label flips with probability eps, for any margin
    for z, e in ((2.0, 0.2), (-0.7, 0.1), (5.0, 0.45)):
        pol = lambda zz: torch.tensor([zz, 0.0], dtype=torch.float64)  # noqa: E731
        rd = lambda zz: dpo_loss(pol(zz), torch.zeros(2, dtype=torch.float64), lens,  # noqa: E731
                                 DPOLossConfig("robust", 0.5, label_smoothing=e))[0].item()
        assert (1 - e) * rd(z) + e * rd(-z) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * z))), abs=1e-12)
    with pytest.raises(ValueError, match="label smoothing applies"):
        DPOLossConfig("sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        DPOLossConfig("robust", label_smoothing=0.5)


def _dpo_flags(*extra):
    from selfreward.cli import parse_config
    from selfreward.train.dpo import DPOConfig
    return parse_config(DPOConfig, ["--model", "m", "--data", "d.jsonl", "--output", "o", *extra])


def test_loss_flags_defaults_and_refusals():
    """Items 6 and 7: unset settings take each loss's paper defaults; a flag the loss does not use is refused."""
    c = _dpo_flags()
    assert (c.loss, c.beta, c.label_smoothing, c.simpo_gamma) == ("sigmoid", 0.1, 0.0, 0.0)
    c = _dpo_flags("--loss", "simpo")                          # SimPO: beta 2, gamma / beta 0.5
    assert (c.beta, c.simpo_gamma) == (2.0, 1.0)
    c = _dpo_flags("--loss", "simpo", "--beta", "2.5")
    assert (c.beta, c.simpo_gamma) == (2.5, 1.25)
    c = _dpo_flags("--loss", "simpo", "--simpo-gamma", "0.3")
    assert (c.beta, c.simpo_gamma) == (2.0, 0.3)
    for t in ("cdpo", "robust"):
        assert _dpo_flags("--loss", t).label_smoothing == 0.1
        assert _dpo_flags("--loss", t, "--label-smoothing", "0.25").label_smoothing == 0.25
    c.check()                                                   # resolving again changes nothing
    assert (c.beta, c.simpo_gamma) == (2.0, 0.3)
    for bad, msg in ((["--label-smoothing", "0.1"], "applies to --loss cdpo / robust only, not sigmoid"),
                     (["--loss", "simpo", "--label-smoothing", "0.1"], "not simpo"),
                     (["--loss", "ipo", "--simpo-gamma", "0.5"], "--simpo-gamma applies to --loss simpo only"),
                     (["--loss", "robust", "--label-smoothing", "0.5"], r"\[0, 0.5\)"),
                     (["--loss", "kto"], "choose one of")):
        with pytest.raises(ConfigError, match=msg):        # the entry scripts print it as `error: ...`, exit 2
            _dpo_flags(*bad)


def test_sft_loss_equals_cross_entropy_on_full_logits():
    model = tiny(3)
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        mask = [False] * 3 + [True] * (n - 3)
        exs.append(Example(ids, mask))
    # rows of 20 (padding tails), end to end in one row (train/sft.py's layout: no padding), one per row
    for row_len, packing in ((20, True), (sum(len(e.ids) - 1 for e in exs), True), (20, False)):
        rows = pack_rows(exs, row_len, pad_id=0, packing=packing)
        lp, ntgt = sft_logp_sum(model, rows)
        assert ntgt == sum(n - 3 for n in (7, 12, 5, 9))
        # the twin: each example alone, full logits, torch's cross-entropy
        ce = 0.0
        for e in exs:
            ids = torch.tensor(e.ids)[None]
            h = model.forward_packed(ids[:, :-1], torch.arange(len(e.ids) - 1)[None])
            tgt = torch.tensor([t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:])])
            ce += F.cross_entropy(model.logits(h[0]), tgt, ignore_index=IGNORE, reduction="sum").item()
        assert abs(-lp.item() - ce) < 1e-4


def test_reference_cache_key_follows_data_and_weights(tmp_path):
    pairs = random_pairs(3)
    a, b = tiny(0), tiny(1)
    ka, kb = weights_hash(a.state_dict()), weights_hash(b.state_dict())
    assert ka != kb and ka == weights_hash(tiny(0).state_dict())
    c = ReferenceCache(tmp_path, pairs, ka)
    assert c.load() is None
    table = compute_reference(a, pairs, [0, 1, 2], 2)
    c.save(table)
    torch.testing.assert_close(ReferenceCache(tmp_path, pairs, ka).load(), table)
    assert ReferenceCache(tmp_path, pairs, kb).load() is None              # other weights
    assert ReferenceCache(tmp_path, random_pairs(3, seed=1), ka).load() is None   # other data
