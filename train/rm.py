"""Reward-model training on soft preference labels (distilled RLAIF): per pair the cross-entropy of the
Bradley-Terry probability sigmoid(r1 - r2) against the label p1, -(p1 log sigmoid(r1 - r2) + (1 - p1) log
sigmoid(r2 - r1)), both replies of a batch in ONE forward. Records, labels, export: train/README.md, "Reward model".

    torchrun --nproc_per_node 8 train/rm.py --model M1 --data labels.jsonl --output runs/rm
    python train/rm.py --model M1 --data labels.jsonl --output runs/rm --max-steps 200 --batch-size 32
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfreward.cli import input_file, passive
from selfreward.model.reward_model import load_reward_model, packed_rewards, seq_cls_config
from selfreward.records import DataError, field
from selfreward.train import loop
from selfreward.train.config import TrainConfig
from selfreward.train.data import Pair, load_pairs, split_data
from selfreward.train.loop import cli, load_policy
from selfreward.train.parallel import Dist


@dataclass
class RMConfig(TrainConfig):
    lr: float = 1e-5                  # RLAIF paper: reward model lr 1e-5, batch 128
    batch_size: int = 128
    max_prompt_length: int = 0        # 0 = max_length // 2; prompts keep BOS + their last tokens
    eval_data: list[str] = input_file([])  # held-out labels, as --data; or use --eval-fraction
    eval_fraction: float = 0.0        # hold out this share of --data (seeded) when no --eval-data
    eval_every: int = passive(0)               # also evaluate every N steps (always at start and end)
    head_seed: int = 0                # seed of the fresh score head (when --model is a causal LM)
    hard_labels: bool = False         # response_1/response_2 records without 'label': response_1 wins (p1 = 1)


def _label(rec: dict, where: str, hard: bool) -> tuple[dict, float]:
    """-> (the record with chosen / rejected, p1 from its `label`); without a label, p1 = 1 where the record's
    layout (chosen / rejected) or --hard-labels says response 1 wins."""
    soft = "response_1" in rec or "response_2" in rec
    if soft:
        rec = dict(rec, chosen=field(rec, "response_1", where), rejected=field(rec, "response_2", where))
    if "label" not in rec:
        if hard or not soft:
            return rec, 1.0
        raise DataError(f"{where}: field 'label' missing: a response_1/response_2 record needs [p1, p2] (pass "
                        f"--hard-labels if response_1 is the preferred reply of every such record)")
    lab = rec["label"]
    ok = isinstance(lab, list) and len(lab) == 2 and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in lab)
    if not ok or abs(lab[0] + lab[1] - 1) > 1e-3:
        raise DataError(f"{where}: field 'label' should be [p1, p2], probabilities summing to 1, got {lab!r}")
    return rec, float(lab[0])


def load_labeled(paths: list[str], tok, max_length: int, max_prompt_length: int,
                 hard_labels: bool = False) -> tuple[list[Pair], dict]:
    """Pairs with p1 = P(response 1, as `chosen`, is better)."""
    return load_pairs(paths, tok, max_length, max_prompt_length, lambda rec, where: _label(rec, where, hard_labels))


def pair_rewards(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1 [B], r2 [B]) from one forward over the 2B sequences prompt + response."""
    r = packed_rewards(model, [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], pad_id)
    return r[:len(pairs)], r[len(pairs):]


def soft_bt_loss(r1: torch.Tensor, r2: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """[B] cross-entropy of sigmoid(r1 - r2) against the soft label p1."""
    d = r1 - r2
    return -(p1 * F.logsigmoid(d) + (1 - p1) * F.logsigmoid(-d))


class RMTask(loop.Task):
    """The labelled pairs (held-out part included) and the reward model; exported as sequence classification."""
    eval_keys, eval_norm = ("loss", "accuracy"), "pairs"

    def __init__(self, cfg: RMConfig, d: Dist, tok):
        self.pad_id = tok.pad_id
        mpl = cfg.max_prompt_length or cfg.max_length // 2
        self.train, self.held_out, counts = split_data(
            cfg, lambda paths: load_labeled(paths, tok, cfg.max_length, mpl, cfg.hard_labels))
        d.print(f"[rm] read {counts['read']} labelled pairs; truncated to {cfg.max_length} tokens: "
                f"{counts['truncated']}; held out: {len(self.held_out)}")
        self.model = load_policy(cfg, d, load_reward_model, seed=cfg.head_seed)
        self.hf_config = seq_cls_config(self.model.cfg, tok.pad_id)

    def sums(self, model, pairs: list[Pair]) -> dict:
        r1, r2 = pair_rewards(model, pairs, self.pad_id)
        p1 = torch.tensor([p.p1 for p in pairs], device=r1.device)
        loss = soft_bt_loss(r1, r2, p1).sum()
        side = ((r1 > r2).float() == (p1 > 0.5).float()).float()[p1 != 0.5]   # ties in the label don't count
        toks = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        return {"loss_sum": loss, "agree": side.sum().detach(), "decided": torch.tensor(float(side.numel())),
                "margin": (r1 - r2).detach().sum(), "tokens": torch.tensor(toks), "pairs": torch.tensor(len(pairs))}

    def summarize(self, s: dict, norm: float) -> dict:
        return {"loss": s["loss_sum"] / norm, "accuracy": s["agree"] / max(1.0, s["decided"]),
                "margin": s["margin"] / max(1.0, s["pairs"])}


train, main = loop.entry(RMConfig, "rm", RMTask, __doc__)

if __name__ == "__main__":
    cli(main)
