"""Building the world's starting point: tokenizer, M0 (pretrained on "web" text), the seeds, M1.

Every step goes through the user's commands: M0 is a random tiny Llama saved as a HF folder and then trained
by train/sft.py on `{"text"}` web documents (loss on all tokens); M1 is train/sft.py on the IFT + EFT seeds
(plain chat template, loss on the replies). The tokenizer and M0 are cached under a key of their settings,
so a second run starts at the seeds.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from selfreward.recipes.world.data import eft_seed, ift_seed, web_docs
from selfreward.recipes.world.judging import check_format
from selfreward.recipes.world.tasks import parse_kinds
from selfreward.records import write_jsonl


@dataclass
class WorldModelConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    vocab: int = 160
    context: int = 256
    # M0 pretraining on web text
    web_docs: int = 20000
    web_p_right: float = 0.75
    web_p_judge: float = 0.4
    pretrain_steps: int = 1000
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    seed: int = 0
    # the judge's chain of thought (recipes/world/judging.py): "check" (local verification steps, the
    # default) or "answer" (per position: candidate symbol, expected symbol, mark). It shapes the web text's
    # grading documents and the EFT seed, so it is part of M0's cache key.
    judge_format: str = "check"
    # the task kinds of the world (recipes/world/tasks.py); part of the key: the web text depends on them
    kinds: str = "max,min,sort,reverse"

    def kind_tuple(self) -> tuple[str, ...]:
        return parse_kinds(self.kinds)

    def key(self) -> str:
        d = asdict(self)
        if d["judge_format"] == "answer":   # the key M0s built before the "check" format had
            del d["judge_format"]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def run_sft(cfg, nproc: int) -> None:
    """train/sft.py's train(cfg): in this process for one rank, under torchrun for more (as a user runs it)."""
    from selfreward.cli import launch
    from selfreward.train.sft import train
    launch(train, cfg, "selfreward.train.sft", nproc, Path(cfg.output) / "sft_config.json")


def build_m0(cache: Path, mc: WorldModelConfig, nproc: int = 1, threads: int = 0) -> Path:
    """-> the folder of M0 (cached: returned at once when it exists)."""
    from selfreward.model.checkpoint import save_model
    from selfreward.model.config import ModelConfig
    from selfreward.model.llama import Transformer
    from selfreward.recipes.world.vocab import train_tokenizer

    kinds, fmt = mc.kind_tuple(), check_format(mc.judge_format)
    home = cache / f"m0-{mc.key()}"
    m0 = home / "model"
    if (m0 / "config.json").exists():
        print(f"[world] M0 from cache: {m0}", flush=True)
        return m0
    tok_dir = train_tokenizer(home / "tokenizer", seed=mc.seed, vocab_size=mc.vocab, kinds=kinds, fmt=fmt)
    cfg = ModelConfig(vocab_size=mc.vocab, hidden_size=mc.hidden, intermediate_size=mc.ffn,
                      num_hidden_layers=mc.layers, num_attention_heads=mc.heads, max_position_embeddings=mc.context,
                      bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    model = Transformer(cfg)
    model.init_weights(seed=mc.seed)
    save_model(model, cfg, home / "init", tokenizer_dir=tok_dir)
    web = write_jsonl(home / "web.jsonl", web_docs(mc.web_docs, mc.seed, mc.web_p_right, mc.web_p_judge,
                                                      kinds, fmt))
    n = sum(p.numel() for p in model.parameters())
    print(f"[world] M0: {n / 1e6:.2f}M parameters, pretraining {mc.pretrain_steps} steps on {mc.web_docs} "
          f"web documents", flush=True)
    del model
    from selfreward.train.sft import SFTConfig
    run_sft(SFTConfig(model=str(home / "init"), data=[str(web)], output=str(home / "pretrain"), export=str(m0),
                      max_steps=mc.pretrain_steps, batch_size=mc.pretrain_batch, lr=mc.pretrain_lr,
                      final_lr=mc.pretrain_lr / 10, max_length=128, dropout=0.0, seed=mc.seed, resume=True,
                      log_every=25, weight_decay=0.0, threads=threads), nproc)
    shutil.rmtree(home / "init", ignore_errors=True)
    return m0


def write_seeds(run_dir: Path, n_ift: int, n_eft: int, seed: int, mc: WorldModelConfig) -> tuple[Path, Path]:
    kinds, fmt = mc.kind_tuple(), mc.judge_format
    ift = write_jsonl(run_dir / "seed" / "ift.jsonl", ift_seed(n_ift, seed, kinds))
    eft = write_jsonl(run_dir / "seed" / "eft.jsonl", eft_seed(n_eft, seed, kinds, fmt))
    return ift, eft
