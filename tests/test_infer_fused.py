"""The CPU inference layout (model/fused.py, applied by Engine): the same parameters, the same function.

References: a second copy of each checkpoint that no Engine touched (the separate q/k/v and gate/up
projections of model/llama.py, weights in nn.Linear's own layout) and transformers' own forward."""
import pytest
import torch

from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
from selfreward.model.checkpoint import load_model
from selfreward.model.fused import fused_ok
from hf_tiny import make_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama3", "qwen2", "llama_tied"])
def ck(request, tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "m", request.param)


def _ids(n=23, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _fused(ck):
    """A model an Engine has laid out, and the engine."""
    m = load_model(ck).eval()
    eng = Engine(m, block_size=4, num_blocks=64)
    a, f = m.layers[0].attention, m.layers[0].feed_forward
    assert eng.fused and fused_ok([a.wq, a.wk, a.wv], a.fused_ptrs) and fused_ok([f.w1, f.w3], f.fused_ptrs)
    return m, eng


def _recorded_logits(model):
    """Wrap model.logits to keep every [B, V] it returns (the engine samples from these)."""
    seen, inner = [], model.logits
    def logits(h):
        out = inner(h)
        seen.append(out.clone())
        return out
    model.logits = logits
    return seen


def test_same_parameters_after_layout(ck, tmp_path):
    ref = load_model(ck)
    m, _ = _fused(ck)
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in m.named_parameters()] == names
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q), n
    a = m.layers[1].attention
    nq, nk = a.wq.weight.shape[0], a.wk.weight.shape[0]
    assert torch.equal(a.wqkv_t[:, nq:nq + nk], ref.layers[1].attention.wk.weight.T)   # k's columns are wk
    assert a.wq.weight.data_ptr() == a.wqkv_t.data_ptr()                                 # a view, no copy
    if a.wq.bias is not None:
        assert torch.equal(a.bqkv[nq:nq + nk], ref.layers[1].attention.wk.bias)
    from selfreward.model.checkpoint import save_model
    save_model(m, m.cfg, tmp_path / "again")
    back = load_model(tmp_path / "again")
    assert all(torch.equal(p, q) for p, q in zip(back.parameters(), ref.parameters()))


def test_fused_forward_equals_unfused_and_transformers(ck):
    import transformers as tf
    ref = load_model(ck).eval()
    m, _ = _fused(ck)
    hf = tf.AutoModelForCausalLM.from_pretrained(ck, torch_dtype=torch.float32).eval()
    ids = torch.tensor([_ids(23), [0] * 6 + _ids(17, seed=1)])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        got, want = m.forward_batch(ids, mask), ref.forward_batch(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-5
    assert (got[mask.bool()] - theirs[mask.bool()]).abs().max() < 1e-4


def test_decode_logits_equal_unfused_full_forward(ck):
    ref = load_model(ck).eval()
    m, eng = _fused(ck)
    seen = _recorded_logits(m)
    prompts = [_ids(9), _ids(14, seed=2), _ids(5, seed=3)]
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    steps = seen[1:]             # seen[0]: the prefill's last positions; then one decode step per token
    assert len(steps) == 7 and all(s.shape[0] == 3 for s in steps)
    with torch.no_grad():
        for p, o in zip(prompts, out):
            full = ref.forward_batch(torch.tensor([p + o[0].token_ids]))[0]          # [T, V]
            assert o[0].token_ids == full[len(p) - 1:-1].argmax(-1).tolist()
            for j, s in enumerate(steps):    # decode rows are ordered by length: this prompt's is one of them
                assert (s - full[len(p) + j]).abs().max(-1).values.min() < 1e-5


def test_in_place_update_reaches_the_fused_weights(ck):
    """load_from_fsdp and trainers write parameters in place: the engine must compute with the new values."""
    m, eng = _fused(ck)
    prompt = _ids(11, seed=4)
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=3))    # (a tied head's copy now exists)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    eng.bm.cache.clear()                        # as load_from_fsdp does: the cached KV is the old weights'
    ref = load_model(ck).eval()
    ref.load_state_dict(m.state_dict())
    got = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True))[0][0]
    with torch.no_grad():
        full = ref.forward_batch(torch.tensor([prompt + got.token_ids]))[0, len(prompt) - 1:-1]
    assert got.token_ids == full.argmax(-1).tolist()
    assert got.logprobs == pytest.approx(full.log_softmax(-1).max(-1).values.tolist(), abs=1e-5)


def test_reassigned_parameters_fall_back(ck):
    m, _ = _fused(ck)
    sd = {k: v + 0.01 for k, v in load_model(ck).state_dict().items()}
    m.load_state_dict(sd, assign=True)          # new tensors: the fused copies are stale, and not used
    a = m.layers[0].attention
    assert not fused_ok([a.wq, a.wk, a.wv], a.fused_ptrs)
    ref = load_model(ck).eval()
    ref.load_state_dict(sd)
    ids = torch.tensor([_ids(13)])
    with torch.no_grad():
        assert (m.forward_batch(ids) - ref.forward_batch(ids)).abs().max() < 1e-5


def test_training_gradients_unchanged_after_layout(ck):
    """With gradients on, the forward takes the separate projections: every parameter gets its gradient."""
    ref = load_model(ck)
    m, _ = _fused(ck)
    ids = torch.tensor([_ids(19)])
    grads = []
    for model in (m, ref):
        model.train()
        model.zero_grad()
        model.forward_batch(ids)[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[1].items():
        assert grads[0][n] is not None and (grads[0][n] - g).abs().max() < 1e-5, n
