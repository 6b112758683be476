"""The engine against transformers' greedy generate, a no-cache reference loop, and full-forward log-probs."""
import pytest
import torch

from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
from selfreward.model.checkpoint import load_model
from hf_tiny import make_hf_checkpoint

EOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


class IdsTokenizer:
    """Stands in for a tokenizer on the tiny random checkpoints: a token's text is its id."""
    eos_id, bos_id, stop_ids = EOS, 1, [EOS]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids if i not in (1, EOS))


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def tiny(request, tmp_path_factory):
    ck = make_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return ck, load_model(ck).eval()


def _prompts(lens=(5, 17, 9, 1, 30), seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _nocache_greedy(model, prompt, steps, stop_at_eos=False):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model.forward_batch(torch.tensor([ids]))[0, -1].argmax()))
            if stop_at_eos and ids[-1] == EOS:
                break
    return ids[len(prompt):]


def test_greedy_equals_transformers_and_nocache(tiny):
    import transformers as tf
    ck, model = tiny
    prompts, steps = _prompts(), 24
    hf = tf.AutoModelForCausalLM.from_pretrained(ck, torch_dtype=torch.float32).eval()
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):            # one left-padded batch, as users call HF
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                          pad_token_id=0, eos_token_id=EOS)[:, T:].tolist()
    eng = Engine(model, block_size=4, num_blocks=64)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=steps))
    for p, r, o in zip(prompts, ref, out):
        r = r[:r.index(EOS) + 1] if EOS in r else r
        assert o[0].token_ids == r
        assert o[0].finish_reason == ("stop" if r[-1] == EOS else "length")
        assert o[0].token_ids == _nocache_greedy(model, p, steps, stop_at_eos=True)
    # ignore_eos: exactly max_tokens tokens, still the no-cache argmax sequence
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    for p, o in zip(prompts, out):
        assert o[0].token_ids == _nocache_greedy(model, p, steps) and o[0].finish_reason == "length"


def test_preemption_gives_identical_outputs(tiny):
    _, model = tiny
    prompts = _prompts(seed=1)
    sp = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True)]
    for params in sp:
        roomy = Engine(model, block_size=4, num_blocks=128).generate(prompts, params, n=2)
        small = Engine(model, block_size=4, num_blocks=14)   # 56 slots: 5 prompts x 2 samples cannot all fit
        tight = small.generate(prompts, params, n=2)
        assert small.stats["preempted"] > 0
        assert [[c.token_ids for c in r] for r in tight] == [[c.token_ids for c in r] for r in roomy]


def test_forked_samples_equal_separate_requests(tiny):
    _, model = tiny
    prompts = _prompts(lens=(7, 13), seed=2)   # 7 and 13: partial last blocks (block 4), shared then copied
    sp = dict(temperature=1.0, top_p=0.9, top_k=40, max_tokens=12, ignore_eos=True, logprobs=True)
    eng = Engine(model, block_size=4, num_blocks=64)
    shared = eng.generate(prompts, SamplingParams(seed=10, **sp), n=3)
    assert eng.bm.num_cow > 0
    alone = Engine(model, block_size=4, num_blocks=64, prefix_cache=False)
    for i, p in enumerate(prompts):
        for j in range(3):
            c = alone.generate([p], SamplingParams(seed=10 + j, **sp))[0][0]
            assert c.token_ids == shared[i][j].token_ids
            assert c.logprobs == pytest.approx(shared[i][j].logprobs, abs=1e-5)
    assert len({tuple(c.token_ids) for c in shared[0]}) > 1   # different seeds, different samples


def test_seeded_sampling_independent_of_batch(tiny):
    _, model = tiny
    target = _prompts(lens=(6,), seed=5)[0]
    sp = SamplingParams(temperature=0.9, top_k=50, seed=123, max_tokens=16, ignore_eos=True)
    alone = Engine(model, block_size=4, num_blocks=64).generate([target], sp)[0][0].token_ids
    others = _prompts(lens=(3, 20, 11), seed=6)
    mixed = Engine(model, block_size=4, num_blocks=64, max_num_seqs=3).generate(
        others[:2] + [target] + others[2:], [SamplingParams(temperature=1.0, seed=s, max_tokens=9) for s in (1, 2)]
        + [sp] + [SamplingParams(temperature=0)], n=1)
    assert mixed[2][0].token_ids == alone


def test_logprobs_stop_and_limits(tiny):
    _, model = tiny
    prompt = _prompts(lens=(9,), seed=7)[0]
    eng = Engine(model, IdsTokenizer(), block_size=4, num_blocks=64)
    c = eng.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=10, ignore_eos=True,
                                              logprobs=True))[0][0]
    assert len(c.token_ids) == 10 and c.finish_reason == "length"
    with torch.no_grad():   # log-probs of the unmodified distribution, from one full forward
        logits = model.forward_batch(torch.tensor([prompt + c.token_ids]))[0, len(prompt) - 1:-1]
    ref = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert c.logprobs == pytest.approx(ref.tolist(), abs=1e-5)
    # stop token id: the sample ends at its first occurrence (kept in token_ids, left out of the text)
    stop_tok = c.token_ids[4]
    s = eng.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[stop_tok]))[0][0]
    k = c.token_ids.index(stop_tok)
    assert s.token_ids == c.token_ids[:k + 1] and s.finish_reason == "stop"
    assert s.text == IdsTokenizer().decode(c.token_ids[:k])
    # stop string: the text is cut right before it
    stop_str = f"<{c.token_ids[6]}><{c.token_ids[7]}>"
    s = eng.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=10, ignore_eos=True,
                                              stop=[stop_str]))[0][0]
    full = IdsTokenizer().decode(c.token_ids)
    assert s.finish_reason == "stop" and s.text == full[:full.index(stop_str)]
    # EOS ends a sample unless ignore_eos
    greedy = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0][0]
    eng.eos = {greedy.token_ids[2]}
    g = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0][0]
    assert g.token_ids == greedy.token_ids[:greedy.token_ids.index(greedy.token_ids[2]) + 1]
    assert g.finish_reason == "stop"


def check_score_and_next_token(eng, model, prompts, conts):
    """eng.score and eng.next_token_logprobs == the full forward's log-probs, twice (the second round is
    served mostly from the prefix cache)."""
    for _ in range(2):
        got = eng.score(prompts, conts)
        for p, c, g in zip(prompts, conts, got):
            with torch.no_grad():
                lp = model.forward_batch(torch.tensor([p + c]))[0].log_softmax(-1)
            ref = lp[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None])[:, 0]
            assert g == pytest.approx(ref.tolist(), abs=1e-5)
    assert eng.stats["prefix_hit"] > 0
    cands = [3, 7, 100, 2]
    nt = eng.next_token_logprobs(prompts, cands)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.forward_batch(torch.tensor([p]))[0, -1].log_softmax(-1)[cands]
        assert torch.allclose(nt[i], ref, atol=1e-5)


def test_score_and_next_token_logprobs(tiny):
    _, model = tiny
    rubric = _prompts(lens=(22,), seed=8)[0]          # a shared prefix: served by the prefix cache
    prompts = [rubric + p for p in _prompts(lens=(3, 8, 1), seed=9)] + [[5]]
    conts = _prompts(lens=(4, 1, 9, 6), seed=10)
    check_score_and_next_token(Engine(model, block_size=4, num_blocks=64), model, prompts, conts)


def test_shared_prefix_decode_equals_nocache(tiny, monkeypatch):
    """Prompts that share a long prefix (a judge's rubric before each reply) decode through the cascade path
    (kernels/paged.py: the common blocks attended once): greedy ids equal transformers' and the no-cache loop."""
    import transformers as tf
    from selfreward.kernels import paged
    ck, model = tiny
    rubric = _prompts((21,), seed=3)[0]
    prompts = [rubric + tail for tail in _prompts((3, 8, 1, 12), seed=4)]
    seen = []
    ref_decode = paged.paged_decode_ref
    monkeypatch.setattr(paged, "paged_decode_ref", lambda *a, **k: seen.append(k.get("shared", 0)) or ref_decode(*a, **k))
    import selfreward.kernels.ops as K
    monkeypatch.setattr(K, "paged_decode", K._switch(paged.paged_decode_ref))
    hf = tf.AutoModelForCausalLM.from_pretrained(ck, torch_dtype=torch.float32).eval()
    eng = Engine(model, block_size=4, num_blocks=64)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert max(seen) == 5                       # 21 shared tokens: 5 full blocks of 4, every row's own after
    for p, o in zip(prompts, out):
        assert o[0].token_ids == _nocache_greedy(model, p, 10)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    for p, o in zip(prompts, out):
        with torch.no_grad():
            r = hf.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                            eos_token_id=EOS)[0, len(p):].tolist()
        assert o[0].token_ids == (r[:r.index(EOS) + 1] if EOS in r else r)
