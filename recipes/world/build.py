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
from selfreward.recipes.world.judging import JUDGE_TEMPLATE, check_format
from selfreward.recipes.world.tasks import BASE_SIZES, SIZES, parse_kinds
from selfreward.records import write_json, write_jsonl


@dataclass
class WorldModelConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    vocab: int = 160
    context: int = 256
    # M0 pretraining on web text, a curriculum of two phases. Phase 1, the short-list world (tasks.BASE_SIZES:
    # five numbers / digits / letters, kinds `base_kinds`, graded candidates right or one edit away; what
    # M0 was before this world had longer inputs): `base_steps` from random init at `base_lr`; the tokenizer is
    # trained on this phase's text. Phase 2, the world itself (tasks.SIZES, `kinds`): `pretrain_steps` more
    # at `pretrain_lr`. `base_steps` 0: one phase, from random init on the world's text.
    web_docs: int = 20000
    web_p_right: float = 0.75
    web_p_judge: float = 0.4
    base_kinds: str = "max,min,sort,reverse"
    base_steps: int = 1000
    base_lr: float = 3e-3
    pretrain_steps: int = 400
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    seed: int = 0
    # the judge's chain of thought (recipes/world/judging.py): "check" (local verification steps, the
    # default) or "answer" (per position: candidate symbol, expected symbol, mark). It shapes the web text's
    # grading documents and the EFT seed, so it is part of M0's cache key.
    judge_format: str = "check"
    # the task kinds of the world (recipes/world/tasks.py); part of the key: the web text depends on them
    kinds: str = "max,min,sort"

    def kind_tuple(self) -> tuple[str, ...]:
        return parse_kinds(self.kinds)

    def phases(self) -> list[dict]:
        """[(phase 1), phase 2]: what each pretraining phase reads and how long it trains."""
        world = {"kinds": self.kind_tuple(), "sizes": SIZES, "near_misses": True, "steps": self.pretrain_steps,
                 "lr": self.pretrain_lr, "web_seed": self.seed + 1000 * bool(self.base_steps)}
        if not self.base_steps:
            return [world]
        return [{"kinds": parse_kinds(self.base_kinds), "sizes": BASE_SIZES, "near_misses": False,
                 "steps": self.base_steps, "lr": self.base_lr, "web_seed": self.seed}, world]

    def key(self, upto: int | None = None) -> str:
        """M0's identity: its settings and a digest of what the world's code generates for each phase (web text
        with its gradings, EFT-format lines), so a change to the world's code or settings changes the key
        (tests/test_world_m0.py holds the shipped M0 to it). `upto`: the key of the first `upto` phases."""
        ph = self.phases()[:upto]
        d = asdict(self)
        if len(ph) < len(self.phases()):        # an earlier phase: only its own settings
            for k in ("kinds", "pretrain_steps", "pretrain_lr"):
                d.pop(k)
        d["world"] = [world_digest(p, self) for p in ph]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def world_digest(phase: dict, mc: WorldModelConfig, n: int = 300) -> str:
    """SHA-1 of samples of what the world's code writes for `phase` and M0 reads: its web text (which also
    holds the held-out split: no held-out instance is in it) and the tokenizer's EFT-format lines."""
    kinds, sizes, nm, fmt = phase["kinds"], phase["sizes"], phase["near_misses"], mc.judge_format
    parts = [d["text"] for d in web_docs(n, phase["web_seed"], mc.web_p_right, mc.web_p_judge, kinds, fmt, sizes, nm)]
    parts += [r["prompt"] + r["response"] for r in eft_seed(n // 3, mc.seed, kinds, fmt, sizes, nm)]
    parts += [JUDGE_TEMPLATE, json.dumps(sizes, sort_keys=True)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def run_sft(cfg, nproc: int) -> None:
    """train/sft.py's train(cfg): in this process for one rank, under torchrun for more (as a user runs it)."""
    from selfreward.cli import launch
    from selfreward.train.sft import train
    launch(train, cfg, "selfreward.train.sft", nproc, Path(cfg.output) / "sft_config.json")


def build_m0(cache: Path, mc: WorldModelConfig, nproc: int = 1, threads: int = 0) -> Path:
    """-> the folder of M0, each phase cached under `cache`/m0-<key of the phases so far> (a phase whose folder
    exists is not trained again)."""
    from selfreward.model.checkpoint import save_model
    from selfreward.model.config import ModelConfig
    from selfreward.model.llama import Transformer
    from selfreward.recipes.world.vocab import train_tokenizer
    from selfreward.train.sft import SFTConfig

    fmt = check_format(mc.judge_format)
    phases, start = mc.phases(), None
    for i, ph in enumerate(phases):
        home = cache / f"m0-{mc.key(i + 1)}"
        m0 = home / "model"
        if (m0 / "config.json").exists():
            print(f"[world] M0 phase {i + 1}/{len(phases)} from cache: {m0}", flush=True)
            start = m0
            continue
        if start is None:      # random init, with a tokenizer trained on this phase's text
            tok_dir = train_tokenizer(home / "tokenizer", mc.seed, mc.vocab, ph["kinds"], fmt, ph["sizes"],
                                      ph["near_misses"])
            cfg = ModelConfig(vocab_size=mc.vocab, hidden_size=mc.hidden, intermediate_size=mc.ffn,
                              num_hidden_layers=mc.layers, num_attention_heads=mc.heads,
                              max_position_embeddings=mc.context, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
            model = Transformer(cfg)
            model.init_weights(seed=mc.seed)
            save_model(model, cfg, home / "init", tokenizer_dir=tok_dir)
            start = home / "init"
            print(f"[world] M0: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
            del model
        web = write_jsonl(home / "web.jsonl", web_docs(mc.web_docs, ph["web_seed"], mc.web_p_right,
                                                          mc.web_p_judge, ph["kinds"], fmt, ph["sizes"],
                                                          ph["near_misses"]))
        print(f"[world] M0 phase {i + 1}/{len(phases)}: pretraining {ph['steps']} steps on {mc.web_docs} web "
              f"documents ({','.join(ph['kinds'])}, sizes {[ph['sizes'][k] for k in ph['kinds']]})", flush=True)
        run_sft(SFTConfig(model=str(start), data=[str(web)], output=str(home / "pretrain"), export=str(m0),
                          max_steps=ph["steps"], batch_size=mc.pretrain_batch, lr=ph["lr"], final_lr=ph["lr"] / 10,
                          max_length=128, dropout=0.0, seed=mc.seed, resume=True, log_every=25, weight_decay=0.0,
                          threads=threads), nproc)
        shutil.rmtree(home / "init", ignore_errors=True)
        start = m0
    return start


SHIPPED = Path(__file__).parent / "m0"      # the M0 that ships with the project (its manifest.json: key, command)


def shipped_key(folder: Path = SHIPPED) -> str | None:
    man = folder / "manifest.json"
    return json.loads(man.read_text())["key"] if man.exists() else None


def m0_folder(mc: WorldModelConfig, cache: Path, rebuild: bool = False, nproc: int = 1, threads: int = 0,
              shipped: Path = SHIPPED) -> Path:
    """The shipped M0 when its key is these settings' and `rebuild` is off; else build_m0 (cached)."""
    have, want = shipped_key(shipped), mc.key()
    if have == want and not rebuild:
        print(f"[world] M0: the shipped one ({shipped}, key {want})", flush=True)
        return shipped
    if not rebuild:
        print(f"[world] M0: the shipped one has key {have}, these settings {want}: building it (cached in {cache})",
              flush=True)
    return build_m0(cache, mc, nproc, threads)


def ship(model_dir: Path, out: Path, mc: WorldModelConfig, command: str) -> Path:
    """Copy M0's files (config, fp32 safetensors, tokenizer) to `out` with manifest.json: the key, the
    settings, the command that built it."""
    import datetime
    out.mkdir(parents=True, exist_ok=True)
    files = tuple(f for f in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
                              "tokenizer_config.json", "chat_template.jinja") if (model_dir / f).exists())
    for f in files:
        shutil.copy2(model_dir / f, out / f)
    man = {"key": mc.key(), "phase_keys": [mc.key(i + 1) for i in range(len(mc.phases()))],
           "settings": asdict(mc), "command": command, "files": list(files),
           "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    write_json(out / "manifest.json", man)
    return out


def main(argv: list[str] | None = None) -> Path:
    """python -m selfreward.recipes.world.build [--out recipes/world/m0] [--cache-dir D] [--threads 2] [--m0-FIELD V]:
    build M0 (each phase cached) and ship it to --out."""
    import os
    import shlex
    import sys

    from selfreward import cli
    ap = cli.Parser(description=main.__doc__)
    ap.add_argument("--out", default=str(SHIPPED))
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "selfreward" / "world"))
    ap.add_argument("--threads", type=int, default=0)
    a, rest = ap.parse_known_args(argv)
    mc = cli.parse_config(WorldModelConfig, [x.replace("--m0-", "--", 1) for x in rest])
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    m0 = build_m0(Path(a.cache_dir), mc, 1, a.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    cmd = "python -m selfreward.recipes.world.build " + " ".join(map(shlex.quote, argv if argv is not None
                                                                        else sys.argv[1:]))
    out = ship(m0, Path(a.out), mc, cmd.strip())
    print(f"[world] M0 (key {mc.key()}) shipped to {out}", flush=True)
    return out


def write_seeds(run_dir: Path, n_ift: int, n_eft: int, seed: int, mc: WorldModelConfig,
                kinds: tuple[str, ...] | None = None, eft_close: float = 0.0) -> tuple[Path, Path]:
    """The IFT and EFT seeds of `kinds` (default: M0's); `eft_close`: data.eft_seed's `close` (the seeds
    are not M0's input: this leaves M0 and its key unchanged)."""
    kinds, fmt = kinds or mc.kind_tuple(), mc.judge_format
    ift, eft = seed_paths(run_dir)
    write_jsonl(ift, ift_seed(n_ift, seed, kinds))
    write_jsonl(eft, eft_seed(n_eft, seed, kinds, fmt, close=eft_close))
    return ift, eft


def seed_paths(run_dir: Path) -> tuple[Path, Path]:
    """Where write_seeds puts the IFT and the EFT seed."""
    return run_dir / "seed" / "ift.jsonl", run_dir / "seed" / "eft.jsonl"


if __name__ == "__main__":
    from selfreward.cli import run_main
    run_main(main)
