"""A tiny random Llama with the stories260k SentencePiece tokenizer (vocab 512), for the recipes' tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.hf_tiny import make_hf_checkpoint


@pytest.fixture
def one_thread():
    """These tests run many tiny forwards: one thread avoids intra-op spin on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SEEDS = ["Write a short story about a cat.", "What is the capital of France?", "How do I bake bread at home?",
         "Give me three tips for sleeping better.", "Explain why the sky is blue.", "Name a fruit that is red.",
         "Tell me a joke about dogs.", "What should I pack for a beach trip?"]


def tiny_chat_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    make_hf_checkpoint(out, "llama_tied", seed=seed, vocab=512, hidden=32, layers=2, heads=2, kv_heads=1,
                       intermediate=64, max_position_embeddings=512)
    shutil.copy(Path(tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    return out


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path
