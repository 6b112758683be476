"""Tokenizer: SentencePiece `tokenizer.model` or HF `tokenizer.json` folders (work in progress)."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(Path(path) / "tokenizer.model"))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
