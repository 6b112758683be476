"""The one place the recipes get engines from: one loaded engine at a time, on the settings of one EngineConfig
(device, dtype, tensor parallelism, pool), built by infer.config.load_engine.

    s = Session(EngineConfig(device="cuda:0", dtype="bfloat16"))
    engine, tok = s.get("runs/m1/model")     # loaded once; the same path again reuses it
    s.release()                               # before a trainer needs the memory
"""

from selfreward.infer import config
from selfreward.infer.config import EngineConfig
from selfreward.records import DataError


class Session:
    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()
        self.path, self.pair = None, None

    def get(self, path: str):
        """(engine, tokenizer) of checkpoint `path`; the tokenizer is the engine's own (loaded once)."""
        if path != self.path:
            self.release()
            engine = config.load_engine(path, self.cfg)   # looked up at call time: tests swap in scripted engines
            if engine.tokenizer is None:
                raise DataError(f"{path}: no tokenizer.model or tokenizer.json beside the weights")
            self.pair, self.path = (engine, engine.tokenizer), path
        return self.pair

    def release(self) -> None:
        close = getattr(self.pair[0], "close", None) if self.pair else None
        self.path, self.pair = None, None
        if close is not None:          # vLLM's engine core process, a client's threads (infer/external.py)
            close()
