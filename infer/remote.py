"""OpenAI-compatible servers as the engine (`--engine-url URL[,URL...]`): `vllm serve`, SGLang, llama.cpp's
server. Each request goes to /v1/completions with the prompt as token ids and `return_token_ids`, spread over
the servers and sent concurrently (`PER_SERVER` in flight each); a refused connection or a 5xx is retried with
back-off, then stops the stage with an error naming the server. The standard library's urllib only.

The server must serve the stage's checkpoint: /v1/models' `root` (the path the server was started on) is
compared with it, and a server of another model is refused (the loop's next iteration needs its servers
restarted on M_{t+1}; docs/engines.md). `flag` is the setting that gave the URL, named in every error
(`--engine-url`; the selection judge's own server: `--judge-url`, recipes/select.py).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfreward.infer.config import EngineConfig
from selfreward.infer.external import Choice, External, Out, Request
from selfreward.records import DataError

PER_SERVER = 16          # requests in flight per server
TRIES = 4                # attempts per request; back-off 1, 2, 4 s between them
TIMEOUT_S = 600          # one request (a long reply on a busy CPU server)


def post(url: str, body: dict | None, timeout: float = TIMEOUT_S, flag: str = "--engine-url") -> dict:
    """GET (body None) or POST JSON -> the JSON reply; retried on connection errors and 5xx, a DataError at the
    end (4xx at once: the request is wrong, the server's message is in the error)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    last = ""
    for k in range(TRIES):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            msg = e.read().decode(errors="replace")[:500]
            if e.code < 500:
                raise DataError(f"{flag} {url}: HTTP {e.code}: {msg}") from None
            last = f"HTTP {e.code}: {msg}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if k + 1 < TRIES:
            time.sleep(2 ** k)
    raise DataError(f"{flag} {url}: no answer after {TRIES} tries ({last}); is the server running?")


def served_model(base: str, path: str, flag: str = "--engine-url") -> str:
    """The model name a server answers to, checked to be `path`'s checkpoint (by /v1/models' root)."""
    models = post(base + "/v1/models", None, timeout=30, flag=flag).get("data") or []
    if not models:
        raise DataError(f"{flag} {base}: /v1/models lists no model")
    m = models[0]
    root = str(m.get("root") or m.get("id"))
    if not same_checkpoint(root, path):
        raise DataError(f"{flag} {base} serves {root}, but this stage needs {path}: start it with "
                        f"`vllm serve {path}` (each iteration's model needs its own server)")
    return m["id"]


def same_checkpoint(root: str, path: str) -> bool:
    """The server's root is this path: the same folder here, or (a server on another node, its own mount) the
    same last two path parts."""
    a, b = Path(root), Path(path)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.parts[-2:] == b.resolve().parts[-2:] or a.parts[-2:] == b.parts[-2:]


def openai_out(reply: dict, n: int, flag: str = "--engine-url") -> Out:
    """A /v1/completions reply (n choices of one prompt) -> Out. Log-probs come as `token_id:N` keys
    (return_tokens_as_token_ids)."""
    choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise DataError(f"{flag}: asked for {n} samples, got {len(choices)}")
    out = []
    for c in choices:
        lp = c.get("logprobs") or None
        chosen = [float(x) for x in lp["token_logprobs"]] if lp and lp.get("token_logprobs") else None
        first = None
        if lp and lp.get("top_logprobs"):
            first = {int(k.removeprefix("token_id:")): float(v) for k, v in (lp["top_logprobs"][0] or {}).items()}
        if c.get("token_ids") is None:
            raise DataError(f"{flag}: the server sent no token_ids (it needs `return_token_ids`: vLLM >= 0.10)")
        out.append(Choice(list(c["token_ids"]), c.get("text") or "", c.get("finish_reason") or "",
                          c.get("stop_reason"), chosen, first))
    plp = None
    raw = choices[0].get("prompt_logprobs") if choices else None
    if raw is not None:
        ids = choices[0].get("prompt_token_ids") or []
        plp = [None if d is None else float(d[str(t)]["logprob"]) for t, d in zip(ids, raw)]
    usage = reply.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Out(out, plp, int(cached))


class RemoteEngine(External):
    backend = "openai"

    def __init__(self, path: str, cfg: EngineConfig, tokenizer, flag: str = "--engine-url"):
        self.flag = flag
        self.urls = [u.strip().rstrip("/").removesuffix("/v1") for u in cfg.url.split(",") if u.strip()]
        if not self.urls:
            raise DataError(f"{flag}: no server given")
        self.names = [served_model(u, str(path), flag) for u in self.urls]
        self.pool = ThreadPoolExecutor(PER_SERVER * len(self.urls))
        super().__init__(str(path), self._complete, tokenizer, chunk=4 * PER_SERVER * len(self.urls))

    def _one(self, k: int, r: Request) -> Out:
        s = k % len(self.urls)
        body = {"model": self.names[s], "prompt": r.prompt, "return_token_ids": True, **r.fields}
        if "logprob_token_ids" in body or "logprobs" in body:
            body.setdefault("logprobs", 0)
            body["return_tokens_as_token_ids"] = True
        return openai_out(post(self.urls[s] + "/v1/completions", body, flag=self.flag), int(body.get("n", 1)),
                          self.flag)

    def _complete(self, reqs: list[Request]) -> list[Out]:
        return list(self.pool.map(self._one, range(len(reqs)), reqs))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
