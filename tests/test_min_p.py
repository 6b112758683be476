"""min_p (keep a token only if its probability is >= min_p x the most likely token's): the sampler against the
rule's own distribution, the engine end to end (min_p 1 leaves only the argmax: the greedy reference loop),
and the flag of infer/sample.py and the loop's candidates reaching the sampler."""
import pytest
import torch

from selfreward.infer.sampling import sample
from selfreward.infer.sequence import SamplingParams


def test_min_p_draws_only_kept_tokens_in_their_renormalised_proportions():
    logits = torch.tensor([[2.0, 1.5, 0.2, -1.0, 0.9, -3.0]])
    q = torch.softmax(logits[0], -1)
    kept = q >= 0.3 * q.max()                                 # by hand: tokens 0, 1, 4 (0.2 / 0.54 = 0.36 ...)
    want = torch.where(kept, q, 0) / q[kept].sum()
    n = 6000
    draws = torch.cat([sample(logits, [1.0], [1.0], [0], [torch.Generator().manual_seed(i)], [0.3])
                       for i in range(n)])
    freq = torch.bincount(draws, minlength=6).double() / n
    assert set(draws.tolist()) == set(kept.nonzero()[:, 0].tolist())
    assert torch.allclose(freq, want.double(), atol=4 * (0.25 / n) ** 0.5)     # 4 standard errors at most
    # min_p 0 is the sampler without the filter, draw for draw
    for i in range(50):
        a = sample(logits, [0.8], [0.9], [0], [torch.Generator().manual_seed(i)], [0.0])
        b = sample(logits, [0.8], [0.9], [0], [torch.Generator().manual_seed(i)])
        assert torch.equal(a, b)


def test_min_p_refused_out_of_range():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_p"):
            SamplingParams(min_p=bad)


def test_min_p_one_is_greedy_in_the_engine(tmp_path):
    from selfreward.infer.engine import Engine
    from selfreward.model.checkpoint import load_model
    from hf_tiny import make_hf_checkpoint
    ck = make_hf_checkpoint(tmp_path / "m", "llama3")
    eng = Engine(load_model(ck).eval(), block_size=4, num_blocks=64)
    prompts = [[5, 9, 17, 3], [40, 41]]
    greedy = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    minp = eng.generate(prompts, SamplingParams(temperature=1.3, min_p=1.0, max_tokens=6, ignore_eos=True, seed=7))
    assert [c[0].token_ids for c in minp] == [c[0].token_ids for c in greedy]


def test_min_p_flag_reaches_the_sampler_and_the_record(tmp_path, monkeypatch):
    import json
    from selfreward.infer import sample as sample_cli
    from recipes_tiny import tiny_chat_model
    m = tiny_chat_model(tmp_path / "m")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "Hello"}) + "\n" + json.dumps({"id": "b", "prompt": "Hi",
                                                                                  "min_p": 0.5}) + "\n")
    seen = []
    real = SamplingParams.__post_init__
    monkeypatch.setattr(SamplingParams, "__post_init__", lambda self: seen.append(self.min_p) or real(self))
    out = tmp_path / "out.jsonl"
    sample_cli.main(["--model", str(m), "--input", str(inp), "--output", str(out), "--min-p", "0.2",
                     "--max-tokens", "3", "--dtype", "float32"])
    assert sorted(set(seen)) == [0.2, 0.5]                   # the flag, and a record's own override
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["made_by"]["min_p"] == 0.2
