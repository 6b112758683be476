"""Helpers for the trainer tests (no tests here): a tiny SentencePiece tokenizer trained on the spot, a tiny
random checkpoint with that tokenizer, and small synthetic SFT / DPO files."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from hf_tiny import make_hf_checkpoint

WORDS = ("the cat dog sat ran on a mat big small red blue one two three four five answer question "
         "tell me story about please sort numbers is what why how yes no good bad").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_spm(out: Path, vocab: int = 128) -> Path:
    import sentencepiece as spm
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_sentence(rng, rng.randint(3, 12)) for _ in range(400)) +
                      "\nUser: System: Assistant:\n" * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    return out / "tokenizer.model"


def make_model(out: Path, spm_model: Path, vocab: int = 128, seed: int = 0, **kw) -> Path:
    """A tiny random Llama (tied embeddings) with the tokenizer beside it."""
    args = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
    args.update(kw)
    make_hf_checkpoint(out, "llama_tied", seed=seed, vocab=vocab, **args)
    shutil.copy(spm_model, out / "tokenizer.model")
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append({"prompt": _sentence(rng, 4), "response": _sentence(rng, rng.randint(3, 9))})
        elif kind == 1:
            out.append({"messages": [{"role": "user", "content": _sentence(rng, 3)},
                                     {"role": "assistant", "content": _sentence(rng, 5)},
                                     {"role": "user", "content": _sentence(rng, 3)},
                                     {"role": "assistant", "content": _sentence(rng, 4)}]})
        else:
            out.append({"text": _sentence(rng, rng.randint(5, 15))})
    return out


def dpo_records(n: int, seed: int = 0) -> list[dict]:
    """Chosen replies are short and about cats; rejected ones long and about dogs: learnable."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"chosen": "The cat sat on a mat.", "rejected": _sentence(rng, rng.randint(4, 10)) + " Dog ran."}
        if i % 2:
            rec["prompt"] = _sentence(rng, 4)
        else:
            rec["messages"] = [{"role": "user", "content": _sentence(rng, 3)}]
        out.append(rec)
    return out
