"""The OpenAI-compatible client engine (infer/remote.py, infer/external.py) against a stub server of the standard
library that answers as vLLM's /v1/completions does, with replies written here by hand: what goes out (token
ids, the stop ids, the fields), what comes back (ids with the stop token, text by our tokenizer, log-probs),
retries, a server that is gone, a server of another model, two servers sharing the work. The same engine
against a real `vllm serve` is tests/test_vllm_backend.py (where vLLM is installed)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hf_tiny import make_hf_checkpoint
from hf_tokenizer import make_hf_tokenizer
from selfreward.infer import remote
from selfreward.infer.config import EngineConfig, load_engine
from selfreward.infer.sequence import SamplingParams
from selfreward.records import DataError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ext") / "m1"
    make_hf_checkpoint(d, vocab=300)
    make_hf_tokenizer(d)
    return d


class Stub:
    """A server on 127.0.0.1: `root` is what /v1/models says it serves; `reply(body)` -> (status, JSON)."""

    def __init__(self, root: str, reply):
        self.root, self.reply, self.bodies = root, reply, []
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "served", "root": stub.root}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                self._send(*stub.reply(body))

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def choice(ids, finish="stop", text="(server's text)", **kw):
    return {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish, "stop_reason": None, **kw}


def test_generate_sends_ids_and_reads_the_servers_ids(ckpt):
    from selfreward.model.tokenizer import Tokenizer
    tok = Tokenizer.load(ckpt)
    stub = Stub(str(ckpt), lambda b: (200, {"choices": [choice([5, 6, 2]), {**choice([7, 8], "length"),
                                                                           "index": 1}]}))
    try:
        eng = load_engine(str(ckpt), EngineConfig(url=stub.url + "/v1"))
        out = eng.generate([[1, 9, 10]], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=3, seed=11), n=2)
    finally:
        stub.close()
    (body,) = stub.bodies
    assert body["prompt"] == [1, 9, 10] and body["model"] == "served" and body["return_token_ids"] is True
    assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (2, 0.7, 0.9, 3, 11)
    assert 2 in body["stop_token_ids"] and "top_k" not in body          # the model's EOS (config: eos 2); top_k off
    a, b = out[0]
    assert a.token_ids == [5, 6, 2] and a.finish_reason == "stop" and a.text == tok.decode([5, 6])
    assert eng.reply_ids(a) == [5, 6]                                   # the stop token left for the trainer
    assert b.token_ids == [7, 8] and b.finish_reason == "length" and b.text == tok.decode([7, 8])
    assert eng.stats["generated"] == 5 and eng.stats["prefill_computed"] == 3


def test_a_stop_string_keeps_the_servers_cut_text(ckpt):
    stub = Stub(str(ckpt), lambda b: (200, {"choices": [choice([5, 6], text="Hi", stop_reason="END")]}))
    try:
        eng = load_engine(str(ckpt), EngineConfig(url=stub.url))
        (c,), = eng.generate([[1, 9]], SamplingParams(stop=["END"], max_tokens=4))
    finally:
        stub.close()
    assert stub.bodies[0]["stop"] == ["END"] and c.text == "Hi" and c.token_ids == [5, 6]


def test_score_and_next_token_logprobs_read_the_servers_logprobs(ckpt):
    def reply(b):
        if "prompt_logprobs" in b:       # score: prompt [1, 9] + continuation [10, 11]
            assert b["prompt"] == [1, 9, 10, 11] and b["prompt_logprobs"] == 0 and b["max_tokens"] == 1
            plp = [None, {"9": {"logprob": -0.5}}, {"10": {"logprob": -1.25}, "3": {"logprob": -0.1}},
                   {"11": {"logprob": -2.0}}]
            return 200, {"choices": [{**choice([4], "length"), "prompt_logprobs": plp,
                                      "prompt_token_ids": [1, 9, 10, 11]}]}
        assert b["logprob_token_ids"] == [20, 21] and b["return_tokens_as_token_ids"] is True
        top = [{"token_id:20": -0.25, "token_id:21": -3.5, "token_id:4": -0.01}]
        return 200, {"choices": [choice([4], "length", logprobs={"token_logprobs": [-0.01], "top_logprobs": top})]}
    stub = Stub(str(ckpt), reply)
    try:
        eng = load_engine(str(ckpt), EngineConfig(url=stub.url))
        assert eng.score([[1, 9], [1]], [[10, 11], []]) == [[-1.25, -2.0], []]
        got = eng.next_token_logprobs([[1, 9, 10]], [20, 21])
    finally:
        stub.close()
    assert torch.equal(got, torch.tensor([[-0.25, -3.5]]))


def test_two_servers_share_the_requests_in_order(ckpt):
    stubs = [Stub(str(ckpt), lambda b, k=k: (200, {"choices": [choice([10 + k, b["prompt"][-1]], "length")]}))
             for k in range(2)]
    try:
        eng = load_engine(str(ckpt), EngineConfig(url=",".join(s.url for s in stubs)))
        out = eng.generate([[1, 30 + i] for i in range(6)], SamplingParams(max_tokens=2))
    finally:
        for s in stubs:
            s.close()
    assert [o[0].token_ids[1] for o in out] == [30 + i for i in range(6)]      # each reply with its own prompt
    assert len(stubs[0].bodies) == 3 and len(stubs[1].bodies) == 3


def test_a_5xx_is_retried_and_a_4xx_is_an_error(ckpt, monkeypatch):
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    seen = []

    def reply(b):
        seen.append(1)
        if b["max_tokens"] == 9:
            return 400, {"error": "max_tokens too large"}
        return (503, {"error": "busy"}) if len(seen) < 3 else (200, {"choices": [choice([5], "length")]})
    stub = Stub(str(ckpt), reply)
    try:
        eng = load_engine(str(ckpt), EngineConfig(url=stub.url))
        assert eng.generate([[1, 9]], SamplingParams(max_tokens=1))[0][0].token_ids == [5]
        assert len(seen) == 3
        with pytest.raises(DataError, match="HTTP 400: .*max_tokens too large"):
            eng.generate([[1, 9]], SamplingParams(max_tokens=9))
    finally:
        stub.close()


def test_a_server_that_is_gone_or_serves_another_model_is_named(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    stub = Stub(str(tmp_path / "other" / "model"), lambda b: (200, {}))
    url = stub.url
    try:
        with pytest.raises(DataError, match=f"--engine-url {url} serves .*other/model, but this stage needs"):
            load_engine(str(ckpt), EngineConfig(url=url))
    finally:
        stub.close()
    with pytest.raises(DataError, match=f"--engine-url {url}/v1/models: no answer after 4 tries .*server running"):
        load_engine(str(ckpt), EngineConfig(url=url))


def test_engine_flags_refuse_two_engines_at_once():
    with pytest.raises(DataError, match="choose one"):
        EngineConfig(url="http://x", backend="vllm").check()
    with pytest.raises(ValueError, match="backend"):
        EngineConfig(backend="sglang").check()
