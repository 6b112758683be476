"""The loop's pairing modes (best-worst, the paper's; best-rest) against hand-built cases, and the SFT mix
(recipes.self_reward --sft-mix): records whose chosen and rejected are one text train only the NLL term,
checked against the plain-PyTorch twin of the DPO loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfreward.cli import ConfigError
from selfreward.recipes.loop_config import LoopConfig
from selfreward.recipes.pairs import build_pairs
from selfreward.recipes.self_reward import write_sft_mix
from selfreward.records import read_jsonl, write_jsonl
from selfreward.train.data import Pair
from selfreward.train.dpo import DPOConfig
from selfreward.train.losses import DPOLossConfig, dpo_loss, pair_batch, sequence_logps

from test_train_losses import assert_grads_close, grads, naive_sequence_logps, random_pairs, tiny


def _case():
    prompts = [{"id": "p", "prompt": "P?", "verdict": "ok"}, {"id": "q", "prompt": "Q?", "verdict": "ok"}]
    # p: texts a (5), b (3), c (1), d (1), e (5: tied with a, so never paired with it nor rejected)
    texts = {"p": ["a", "b", "c", "d", "e", "c"], "q": ["x", "y"]}
    score = {"a": 5, "b": 3, "c": 1, "d": 1, "e": 5, "x": 2, "y": 4}
    cands = [{"id": i, "sample": s, "text": t} for i, ts in texts.items() for s, t in enumerate(ts)]
    judg = [{"id": c["id"], "sample": c["sample"], "k": 0, "score": score[c["text"]]} for c in cands]
    return prompts, cands, judg


def test_best_worst_is_one_pair_per_prompt():
    pairs, counts = build_pairs(*_case())
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("p", "a", "c"), ("q", "y", "x")]
    assert counts["prompts_paired"] == 2


def test_best_rest_pairs_the_best_with_each_lower_text():
    pairs, counts = build_pairs(*_case(), pairing="best-rest")
    assert [(p["id"], p["chosen"], p["rejected"], p["rejected_score"]) for p in pairs] == \
        [("p", "a", "b", 3), ("p", "a", "c", 1), ("p", "a", "d", 1), ("q", "y", "x", 2)]
    assert counts["pairs"] == 4 and counts["prompts_paired"] == 2
    pairs, _ = build_pairs(*_case(), pairing="best-rest", min_margin=3)   # gap 2 (a vs b) is below the margin
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "c"), ("a", "d")]
    with pytest.raises(ValueError, match="pairing"):
        build_pairs(*_case(), pairing="all")


def test_loop_config_checks_pairing_and_sft_mix():
    with pytest.raises(ConfigError, match="--pairing"):
        LoopConfig(pairing="every")
    with pytest.raises(ConfigError, match="nll-alpha"):
        LoopConfig(sft_mix="eft.jsonl", dpo=DPOConfig(nll_alpha=0.0))
    LoopConfig(sft_mix="eft.jsonl", dpo=DPOConfig(nll_alpha=1.0), pairing="best-rest")


def test_write_sft_mix_repeats_records_as_same_text_pairs(tmp_path):
    src = write_jsonl(tmp_path / "eft.jsonl", [{"prompt": "J1", "response": "r1"}, {"prompt": "J2", "response": "r2"}])
    cfg = LoopConfig(run_dir=str(tmp_path / "run"), sft_mix=str(src), sft_mix_repeat=2, dpo=DPOConfig(nll_alpha=1.0))
    (tmp_path / "it").mkdir()
    recs = read_jsonl(write_sft_mix(cfg, tmp_path / "it"))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in recs] == [("J1", "r1", "r1"), ("J2", "r2", "r2")] * 2


def test_same_text_records_train_only_the_nll_term():
    # the fused loss on real pairs + same-text records == the naive DPO loss on the real pairs plus
    # alpha x per-token NLL of the same-text records' response (plain torch), in value and every gradient
    torch.manual_seed(0)
    policy, ref = tiny(3), tiny(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    real = random_pairs(3, seed=1)
    same = [Pair(q.prompt, q.chosen, list(q.chosen)) for q in random_pairs(2, seed=2)]
    alpha, beta = 3.0, 0.1
    pairs = real + same
    b = pair_batch(pairs, True)
    with torch.no_grad():
        r = naive_sequence_logps(ref, pairs)
    loss, _, _ = dpo_loss(sequence_logps(policy, b), r, b.resp_len, DPOLossConfig("sigmoid", beta, 0.0, 0.0, alpha))
    loss.sum().backward()
    got_loss, got = loss.detach(), grads(policy)

    B, n = len(real), len(pairs)
    pol = naive_sequence_logps(policy, pairs)                              # [2n]
    lens = torch.tensor([len(q.chosen) for q in pairs] + [len(q.rejected) for q in pairs], dtype=pol.dtype)
    z = (pol[:B] - r[:B]) - (pol[n:n + B] - r[n:n + B])
    want = torch.cat([-F.logsigmoid(beta * z) - alpha * pol[:B] / lens[:B],
                      torch.log(torch.tensor(2.0, dtype=pol.dtype)) - alpha * pol[B:n] / lens[B:n]])
    want.sum().backward()
    assert torch.allclose(got_loss, want.detach(), atol=1e-5)
    assert_grads_close(got, grads(policy))
