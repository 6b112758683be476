"""Checkpoint I/O: round trips through transformers, sharding, and the errors that name file and tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfreward.model.checkpoint import CheckpointError, load_model, save_model
from selfreward.model.config import ConfigError, ModelConfig
from hf_tiny import make_hf_checkpoint

IDS = torch.tensor([[1, 5, 9, 33, 7, 100, 2], [1, 64, 3, 3, 90, 12, 45]])


def _hf_logits(path):
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=IDS).logits.float()


@pytest.mark.parametrize("family", ["llama3", "qwen2_tied"])
def test_write_then_transformers_loads_same_logits(tmp_path, family):
    src = make_hf_checkpoint(tmp_path / "src", family)
    model = load_model(src).eval()
    out = save_model(model, model.cfg, tmp_path / "out")
    with torch.no_grad():
        ours = model.forward_batch(IDS)
    assert (_hf_logits(out) - ours).abs().max().item() <= 1e-4
    assert (_hf_logits(out) - _hf_logits(src)).abs().max().item() == 0.0


def test_load_write_tensors_equal_and_sharded(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama3")
    model = load_model(src)
    out = save_model(model, model.cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = load_file(str(src / "model.safetensors"))
    back = load_model(out)
    again = save_model(back, back.cfg, tmp_path / "single")
    b = load_file(str(again / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_load(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "mistral")
    m = load_model(src, dtype=torch.bfloat16)
    assert m.tok_embeddings.weight.dtype == torch.bfloat16


def test_error_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8,
        "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "empty")


def _mutate(tmp_path, fn):
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied")
    f = src / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})
    return src


def test_error_missing_tensor(tmp_path):
    src = _mutate(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(src)


def test_error_unexpected_tensor(tmp_path):
    src = _mutate(tmp_path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(src)


def test_error_shape_mismatch(tmp_path):
    src = _mutate(tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(63,\)"):
        load_model(src)


def test_error_tokenizer_larger_than_embedding(tmp_path):
    from hf_tokenizer import make_hf_tokenizer
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied", vocab=128)
    make_hf_tokenizer(src, vocab=300)
    with pytest.raises(CheckpointError, match=r"tokenizer.json: tokenizer has 300 tokens.*'vocab_size'.*128"):
        load_model(src)


def test_error_missing_shard(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied")
    out = save_model(load_model(src), ModelConfig.from_json(src), tmp_path / "sh", max_shard_bytes=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {victim.name}, which is missing"):
        load_model(out)


@pytest.mark.parametrize("field,value,msg", [
    ("model_type", "gpt2", "'model_type': 'gpt2' is not supported"),
    ("hidden_act", "gelu", "'hidden_act'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type 'yarn' is not supported"),
    ("num_key_value_heads", 3, "'num_key_value_heads'"),
])
def test_error_unsupported_config(tmp_path, field, value, msg):
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied")
    raw = json.loads((src / "config.json").read_text())
    raw[field] = value
    raw.pop("rope_parameters", None) if field == "rope_scaling" else None
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=msg):
        load_model(src)


def test_error_bad_json(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied")
    (src / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(ConfigError, match=r"config.json: line 2"):
        load_model(src)


def test_save_is_atomic_on_failure(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama_tied")
    model = load_model(src)
    out = save_model(model, model.cfg, tmp_path / "out")
    before = load_file(str(out / "model.safetensors"))
    sd = {k: v for k, v in model.state_dict().items() if k != "norm"}
    with pytest.raises(CheckpointError, match="no 'norm'"):
        save_model(sd, model.cfg, tmp_path / "out")
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(tmp_path.glob(".out.tmp*"))
