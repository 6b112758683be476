"""Issue 20, sampler: chunked prefill, the decode step's persistent tensors, the CUDA-graphs flag.

Chunked prefill is checked against the unchunked engine and against a no-cache full forward (greedy ids,
log-probs, score, next-token log-probs, with and without the prefix cache); the decode tensors kept in
place against tensors built from the sequences' lists at every step; the CUDA-graphs flag only for its
wiring and validation on the CPU (the graph path itself is untested: no GPU has run it).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfreward.infer.config import EngineConfig, load_engine
from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
from selfreward.model.checkpoint import load_model
from selfreward.records import DataError
from hf_tiny import make_hf_checkpoint
from test_infer import check_score_and_next_token

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ck = make_hf_checkpoint(tmp_path_factory.mktemp("llama3") / "m", "llama3")
    return ck, load_model(ck).eval()


def _prompts(lens, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _reference_greedy(model, prompt, steps):
    """Argmax of a full forward over the whole sequence at every step (no cache) and its log-probs."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            lp = model.forward_batch(torch.tensor([ids]))[0, -1].log_softmax(-1)
            ids.append(int(lp.argmax()))
            lps.append(float(lp[ids[-1]]))
    return ids[len(prompt):], lps


@pytest.mark.parametrize("budget", [7, 16, 33])
def test_chunked_prefill_equals_unchunked_and_the_reference(tiny, budget):
    _, model = tiny
    prompts = _prompts((61, 5, 40, 17, 90), seed=1)      # 61, 40, 90 > budget: prefilled in chunks
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    whole = Engine(model, block_size=4, num_blocks=256).generate(prompts, sp)
    eng = Engine(model, block_size=4, num_blocks=256, max_num_batched_tokens=budget)
    steps = []
    orig = eng.scheduler.schedule

    def spy():
        seqs, pre = orig()
        if pre:
            steps.append(sum(s.chunk for s in seqs))
        return seqs, pre
    eng.scheduler.schedule = spy
    chunked = eng.generate(prompts, sp)
    assert max(steps) <= budget and len(steps) >= sum(len(p) for p in prompts) // budget
    for p, w, c in zip(prompts, whole, chunked):
        ref_ids, ref_lps = _reference_greedy(model, p, 12)
        assert c[0].token_ids == w[0].token_ids == ref_ids
        assert c[0].logprobs == pytest.approx(w[0].logprobs, abs=1e-6)
        assert c[0].logprobs == pytest.approx(ref_lps, abs=1e-5)


def test_chunked_prefill_interleaves_with_decode(tiny):
    _, model = tiny
    short, long_ = _prompts((6, 120), seed=2)
    eng = Engine(model, block_size=4, num_blocks=256, max_num_batched_tokens=16)
    kinds = []
    orig = eng.scheduler.schedule

    def spy():
        seqs, pre = orig()
        kinds.append("P" if pre else "D")
        return seqs, pre
    eng.scheduler.schedule = spy
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = eng.generate([short, long_], sp)
    # the first step holds the short prompt and the first 10 tokens of the long one; then chunk / decode
    # alternate until the long prompt is in, so the short sequence kept decoding meanwhile
    assert "".join(kinds[:6]) == "PDPDPD"
    assert out[0][0].token_ids == _reference_greedy(model, short, 20)[0]
    assert out[1][0].token_ids == _reference_greedy(model, long_, 20)[0]


def test_chunked_score_next_and_prefix_cache(tiny):
    _, model = tiny
    rubric = _prompts((45,), seed=3)[0]                   # shared, served by the prefix cache in round 2
    prompts = [rubric + p for p in _prompts((3, 19, 1), seed=4)] + [[5]]
    conts = _prompts((4, 30, 9, 6), seed=5)
    eng = Engine(model, block_size=4, num_blocks=256, max_num_batched_tokens=10)
    check_score_and_next_token(eng, model, prompts, conts)
    # sampled, n=3 forks, prefix cache, chunks of 10: each sample equals the same request unchunked
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    a = eng.generate(prompts[:3], sp, n=3)
    b = Engine(model, block_size=4, num_blocks=256, prefix_cache=False).generate(prompts[:3], sp, n=3)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]


def test_decode_tensors_kept_in_place_equal_a_rebuild(tiny):
    """At every decode step the persistent tensors equal those built from the sequences' lists; a steady
    batch is built from lists once (and again only when a sequence leaves)."""
    _, model = tiny
    prompts = _prompts((7, 13, 4, 22), seed=6)           # partial last blocks: shared, then copied (n=2)
    eng = Engine(model, block_size=4, num_blocks=256)
    runner, checked = eng.runner, []
    orig = runner.decode

    def check(seqs):
        h = orig(seqs)
        d, bs = runner.dec, runner.block_size
        lens = [len(s) for s in seqs]
        assert d.tokens.tolist() == [s.token_ids[-1] for s in seqs]
        assert d.lens.tolist() == lens and d.pos.tolist() == [n - 1 for n in lens]
        for i, s in enumerate(seqs):
            assert d.bt[i, :len(s.block_table)].tolist() == s.block_table
        assert d.slots.tolist() == [s.block_table[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lens)]
        checked.append(len(seqs))
        return h
    runner.decode = check
    sp = [SamplingParams(temperature=0.8, seed=i, max_tokens=m, ignore_eos=True) for i, m in enumerate((30, 9, 30, 18))]
    out = eng.generate(prompts, sp, n=2)
    assert len(checked) == 29 and eng.bm.num_cow > 0
    # one rebuild when the batch forms, one each time a request's two samples leave (after 9 and 18 tokens)
    assert runner.dec.rebuilds == 3
    ref = Engine(model, block_size=4, num_blocks=256, prefix_cache=False)
    for i, p in enumerate(prompts):          # and the samples are those of each request run alone
        for j in range(2):
            alone = ref.generate([p], SamplingParams(temperature=0.8, seed=i + j, max_tokens=sp[i].max_tokens,
                                                     ignore_eos=True))[0][0]
            assert out[i][j].token_ids == alone.token_ids


def test_cuda_graphs_flag_is_validated_on_cpu(tiny, tmp_path):
    ck, model = tiny
    with pytest.raises(DataError, match="cuda_graphs needs a CUDA device"):
        load_engine(ck, EngineConfig(device="cpu", cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device"):
        Engine(model, cuda_graphs=True)
    assert Engine(model, num_blocks=16).runner.graphs is None
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 0, "prompt": "x"}\n')
    r = subprocess.run([sys.executable, "infer/sample.py", "--model", str(ck), "--input", str(inp), "--output",
                        str(tmp_path / "o.jsonl"), "--cuda-graphs"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "error: --cuda-graphs needs a CUDA device" in r.stderr
    assert "Traceback" not in r.stderr


def test_cuda_graph_buckets_and_cpu_path_never_imports_them():
    from selfreward.infer.cuda_graphs import bucket_for, buckets
    assert buckets(1) == [1] and buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(256)[:6] == [1, 2, 4, 8, 16, 32] and buckets(256)[-1] == 256 and len(buckets(256)) == 20
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = buckets(40)
    assert [bucket_for(sizes, b) for b in (1, 3, 8, 9, 33, 40, 41)] == [1, 4, 8, 16, 40, 40, None]
    code = """
import sys, torch
from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer
from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
m = Transformer(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
m.init_weights(seed=0)
Engine(m, num_blocks=16).generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
assert "selfreward.infer.cuda_graphs" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
