"""Sampler start-up: the KV pool is zero without a memset (fresh pages); loading a checkpoint and sampling
import neither torch._dynamo (the `with torch.device("meta")` skeleton cost seconds) nor sympy /
symbolic_shapes (Module.to_empty on meta tensors: 0.3 s) nor transformers; the loaded weights are the
file's pages, copy-on-write (an in-place update never reaches the file)."""
import subprocess
import sys

import torch

from selfreward.infer.runner import LAZY_ZERO_BYTES, _pool


def test_large_cpu_pool_is_zero_even_after_garbage_was_freed():
    shape = (LAZY_ZERO_BYTES // (16 * 4 * 64 * 4), 16, 4, 64)        # exactly LAZY_ZERO_BYTES of fp32
    junk = torch.full(shape, float("nan"))                            # same size, freed just before
    del junk
    for _ in range(2):
        p = _pool(shape, torch.float32, torch.device("cpu"))
        assert p.shape == shape and int(torch.count_nonzero(p)) == 0
        p.fill_(float("nan"))
        del p
    small = _pool((4, 16, 2, 8), torch.float32, torch.device("cpu"))
    assert int(torch.count_nonzero(small)) == 0


def test_load_model_does_not_import_dynamo(tmp_path):
    code = f"""
import sys, torch
from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer
from selfreward.model.checkpoint import load_model, save_model
cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
m = Transformer(cfg)
m.init_weights(seed=0)
save_model(m, cfg, {str(tmp_path / 'm')!r})
assert "torch._dynamo" not in sys.modules, "dynamo before loading"
heavy = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes", "transformers")
assert not [h for h in heavy if h in sys.modules], "imported before loading"
got = load_model({str(tmp_path / 'm')!r})
assert torch.equal(got.tok_embeddings.weight, m.tok_embeddings.weight)
from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
import selfreward.infer.sample
Engine(got, num_blocks=8).generate([[1, 2, 3]], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=3, seed=0))
assert not [h for h in heavy if h in sys.modules], [h for h in heavy if h in sys.modules]
# the weights are the file's pages, copy-on-write: training them in place leaves the file as it was
f = {str(tmp_path / 'm' / 'model.safetensors')!r}
before = open(f, "rb").read()
with torch.no_grad():
    for p in got.parameters():
        p.add_(1.0)
assert open(f, "rb").read() == before
again = load_model({str(tmp_path / 'm')!r})
assert torch.equal(again.layers[0].attention.wq.weight, m.layers[0].attention.wq.weight)
assert torch.equal(got.layers[0].attention.wq.weight, m.layers[0].attention.wq.weight + 1.0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
