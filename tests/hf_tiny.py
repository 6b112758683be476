"""Tiny random Hugging Face checkpoints written by transformers itself, one per family we support."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama3": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0, tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True),
}


def make_hf_checkpoint(out: Path, family: str = "llama_tied", seed: int = 0, vocab: int = 128,
                       hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                       intermediate: int = 96, **over) -> Path:
    import transformers as tf
    spec = dict(FAMILIES[family])
    mt = spec.pop("model_type")
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[mt]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    kw.update(spec)
    kw.update(over)
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise so a mix-up shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return Path(out)
