"""One loaded engine at a time for the recipes' stages: every stage, the evaluation, the judge helpers and the
world's measurements get (engine, tokenizer) here, on the device and dtype of one EngineConfig.

    s = Session(EngineConfig(device="cuda:0", dtype="bfloat16"))
    engine, tok = s.get("runs/m1/model")     # loaded once; the same path again reuses it
    s.release()                               # before a trainer needs the memory
"""
from __future__ import annotations

from selfreward.infer.config import EngineConfig, load_engine


class Session:
    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()
        self.path, self.pair = None, None

    def get(self, path: str):
        """(engine, tokenizer) of checkpoint `path`; the tokenizer is the engine's own (loaded once)."""
        if path != self.path:
            self.release()
            engine = load_engine(path, self.cfg)
            if engine.tokenizer is None:
                from selfreward.records import DataError
                raise DataError(f"{path}: no tokenizer.model or tokenizer.json beside the weights")
            self.pair, self.path = (engine, engine.tokenizer), path
        return self.pair

    def release(self) -> None:
        self.path, self.pair = None, None
