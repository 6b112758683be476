"""A tiny random Llama with a SentencePiece tokenizer trained on the spot, for the recipes' tests (no
../shared needed, so the loop runs in a fresh clone too)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from hf_tiny import make_hf_checkpoint


SEEDS = ["Write a short story about a cat.", "What is the capital of France?", "How do I bake bread at home?",
         "Give me three tips for sleeping better.", "Explain why the sky is blue.", "Name a fruit that is red.",
         "Tell me a joke about dogs.", "What should I pack for a beach trip?"]


def train_tokenizer(path: Path, vocab: int = 400) -> int:
    """A BPE SentencePiece model (byte fallback; unk 0, BOS 1, EOS 2) from the seeds, the judge templates and
    score lines, written to `path`. Returns its vocabulary size. Takes well under a second."""
    import io

    import sentencepiece as spm

    from selfreward.recipes.instruct import InstructConfig
    from selfreward.recipes.judge import DEFAULT_TEMPLATE, SHORT_TEMPLATE
    corpus = SEEDS + SHORT_TEMPLATE.split("\n") + DEFAULT_TEMPLATE.split("\n") + [InstructConfig().header] + \
        [f"Request {i}: Score: {d}" for i in range(12) for d in range(6)] + ["System: User: Assistant: Better: 1 2"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab,
                                   byte_fallback=True, hard_vocab_limit=False, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    Path(path).write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).vocab_size()


def tiny_chat_model(out: Path, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = out.parent / f".{out.name}.tokenizer.model"
    vocab = train_tokenizer(tok)
    make_hf_checkpoint(out, "llama_tied", seed=seed, vocab=vocab, hidden=32, layers=2, heads=2, kv_heads=1,
                       intermediate=64, max_position_embeddings=512)
    shutil.move(tok, out / "tokenizer.model")
    return out


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


NESTED = {"n_candidates": ("candidates", "n"), "temperature": ("candidates", "temperature"),
          "max_tokens": ("candidates", "max_tokens"), "judge_k": ("judge", "k"),
          "judge_max_tokens": ("judge", "max_tokens"), "judge_template": ("judge", "template"),
          "judge_expected": ("judge", "expected"), "judge_distinct": ("judge", "distinct"),
          "prompt_max_tokens": ("instruct", "max_tokens"), "prompt_min_words": ("instruct", "min_words")}


def loop_config(**flat):
    """A LoopConfig from the tests' short flat names (n_candidates=2 -> candidates.n = 2, ...)."""
    from selfreward.cli import from_dict
    from selfreward.recipes.self_reward import LoopConfig
    d: dict = {}
    for k, v in flat.items():
        if k in NESTED:
            sec, name = NESTED[k]
            d.setdefault(sec, {})[name] = v
        elif k == "dpo":
            d["dpo"] = v
        else:
            d[k] = v
    return from_dict(LoopConfig, d)


def torchrun_stage(cfg, run_dir: Path, stage: str, t: int = 1) -> None:
    """Write `cfg` as RUN/config.json and run one of the loop's stages under torchrun on 2 ranks (as the driver
    launches a sharded stage); a non-zero exit fails the test with the tail of stderr."""
    import os
    import subprocess
    import sys
    from selfreward.cli import to_dict
    from selfreward.records import write_json
    from conftest import ROOT
    write_json(run_dir / "config.json", to_dict(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "selfreward.recipes.self_reward", "--config", str(run_dir / "config.json"), "--stage", stage,
           "--iter", str(t)]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
