"""The one place the recipes get engines from: one loaded engine at a time, on the settings of one EngineConfig
(device, dtype, tensor parallelism, pool), built by infer.config.load_engine.

    s = Session(EngineConfig(device="cuda:0", dtype="bfloat16"))
    engine, tok = s.get("runs/m1/model")     # loaded once; the same path again reuses it
    s.release()                               # before a trainer needs the memory
    s.get("judge", url="http://host:8000", url_flag="--judge-url")   # this model alone on a server
"""

import dataclasses

from selfreward.infer import config
from selfreward.infer.config import EngineConfig
from selfreward.records import DataError


class Session:
    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg or EngineConfig()
        self.key, self.pair = None, None

    def get(self, path: str, url: str = "", url_flag: str = "--engine-url"):
        """(engine, tokenizer) of checkpoint `path`; the tokenizer is the engine's own (loaded once). `url`: this
        call's model on OpenAI-compatible server(s) instead of the session's engine (the selection judge's
        `--judge-url`, named in its errors as `url_flag`); the session's other calls keep its own."""
        if (path, url) != self.key:
            self.release()
            # load_engine looked up at call time: tests swap in scripted engines (of two arguments)
            if url:
                cfg = dataclasses.replace(self.cfg, url=url, backend="ours", cuda_graphs=False)
                engine = config.load_engine(path, cfg, url_flag)
            else:
                engine = config.load_engine(path, self.cfg)
            if engine.tokenizer is None:
                raise DataError(f"{path}: no tokenizer.model or tokenizer.json beside the weights")
            self.pair, self.key = (engine, engine.tokenizer), (path, url)
        return self.pair

    def release(self) -> None:
        close = getattr(self.pair[0], "close", None) if self.pair else None
        self.key, self.pair = None, None
        if close is not None:          # vLLM's engine core process, a client's threads (infer/external.py)
            close()
