"""The world's own SentencePiece tokenizer, trained on the world's text.

Small vocabulary (BPE, 160 pieces by default), digits split, and a space + digit one piece, so every
answer symbol (a digit, a letter a-h, a mark + / -) is one token: the judge's per-position comparisons stay one token each. The folder it
writes is a normal Hugging Face tokenizer folder (`tokenizer.model` + `tokenizer_config.json`, no chat
template, so model/tokenizer.py renders chats with its plain template).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from selfreward.recipes.world.data import chat_text, eft_seed, web_docs
from selfreward.recipes.world.tasks import DEFAULT_KINDS

SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}


def corpus(seed: int, n: int = 4000, kinds=DEFAULT_KINDS, fmt: str = "check", sizes: dict | None = None,
           near_misses: bool = True) -> list[str]:
    """Lines covering every template, answer symbol and the judge format, plus the chat headers."""
    lines = [d["text"] for d in web_docs(n, seed, kinds=kinds, fmt=fmt, sizes=sizes, near_misses=near_misses)]
    lines += [chat_text(r["prompt"], r["response"]) for r in eft_seed(n // 4, seed, kinds, fmt, sizes, near_misses)]
    lines.append("System: You are a helpful assistant.")
    return [" ".join(line.split()) for line in lines]


def train_tokenizer(out_dir: str | Path, seed: int = 0, vocab_size: int = 160, kinds=DEFAULT_KINDS,
                    fmt: str = "check", sizes: dict | None = None, near_misses: bool = True) -> Path:
    import sentencepiece as spm

    out_dir = Path(out_dir)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed, kinds=kinds, fmt=fmt, sizes=sizes, near_misses=near_misses)),
        model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, split_digits=True, byte_fallback=False,
        unk_id=SPECIALS["unk"][0], bos_id=SPECIALS["bos"][0], eos_id=SPECIALS["eos"][0],
        pad_id=SPECIALS["pad"][0], pad_piece=SPECIALS["pad"][1],
        user_defined_symbols=["\u2581" + str(d) for d in range(10)],   # ' 7' is one token
        minloglevel=2, num_threads=1)
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "model_max_length": 256, "tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
              "add_eos_token": False}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
