"""Supervised fine-tuning (loss on assistant tokens; on all tokens for {"text"} records).

    torchrun --nproc_per_node 8 train/sft.py --model M0 --data ift.jsonl eft.jsonl --output runs/m1
    python train/sft.py --model M0 --data ift.jsonl --output runs/m1 --max-steps 100 --batch-size 16

What it writes (metrics.jsonl, checkpoints/, the Hugging Face export): train/README.md, "Run folder".
"""

from dataclasses import dataclass, field

import torch

from selfreward.cli import ConfigError, input_file, passive
from selfreward.train import loop
from selfreward.train.config import TrainConfig
from selfreward.train.data import Example, load_sft, pack_rows, split_data
from selfreward.train.loop import cli, load_policy
from selfreward.train.losses import sft_logp_sum


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 5.5e-6                # paper: 5.5e-6 -> 1.1e-6, global batch 16, dropout 0.1
    final_lr: float = 1.1e-6
    packing: bool = True              # the examples end to end, no padding (False: one per row, padded)
    eval_data: list[str] = input_file([])  # held-out data, as --data; or use --eval-fraction
    eval_fraction: float = 0.0        # hold out this share of --data (seeded) when no --eval-data
    eval_every: int = passive(0)               # also evaluate every N steps (always at start and end)
    system_prompt: list[str] = field(default_factory=list)  # FILE=TEXT: system turn for that data file

    def check(self) -> None:
        super().check()
        for s in self.system_prompt:
            path, sep, _ = s.partition("=")
            if not sep or path not in self.data + self.eval_data:
                raise ConfigError(f"--system-prompt {s!r}: expected FILE=TEXT with FILE one of the --data files")


class SFTTask(loop.Task):
    """The SFT data (held-out part included) and the policy; the loss is -(target log-probs) / targets."""
    eval_keys, eval_norm = ("loss",), "targets"                 # eval_loss: the mean token cross-entropy

    def __init__(self, cfg: SFTConfig, d, tok):
        self.cfg, self.pad_id = cfg, tok.pad_id
        systems = dict(s.partition("=")[::2] for s in cfg.system_prompt)
        self.train, self.held_out, counts = split_data(cfg, lambda p: load_sft(p, tok, cfg.max_length, systems))
        d.print(f"[sft] read {counts['read']} examples; truncated to {cfg.max_length} tokens: "
                f"{counts['truncated']}; dropped (no target left): {counts['dropped']}; held out: {len(self.held_out)}")
        self.counts = {"truncated": counts["truncated"], "dropped": counts["dropped"]}
        self.model = load_policy(cfg, d)

    def norm(self, batch: list[int]) -> float:
        return float(max(1, sum(sum(self.train[i].mask[1:]) for i in batch)))

    def sums(self, model, exs: list[Example]) -> dict:
        # packing: the examples end to end in one row, no padding (the model's axis is flat: rows of
        # --max-length would add padding tails computed as sequences of their own; benchmarks/README.md, issue 30)
        toks = sum(len(e.ids) - 1 for e in exs)
        lp, n = sft_logp_sum(model, pack_rows(exs, toks, self.pad_id, self.cfg.packing))
        return {"loss_sum": -lp, "targets": torch.tensor(n), "tokens": torch.tensor(toks)}

    def summarize(self, s: dict, norm: float) -> dict:
        return {"loss": s["loss_sum"] / norm, "targets": int(s["targets"])}


train, main = loop.entry(SFTConfig, "sft", SFTTask, __doc__)

if __name__ == "__main__":
    cli(main)
