"""GGUF in, Hugging Face out: `python -m selfreward.model.gguf IN.gguf OUT/ [--dtype bf16|fp16|fp32]` writes a
folder that load_model and transformers both read (model.safetensors, config.json, tokenizer, generation config).
Llama architecture only, with a GPT-2-style byte-level BPE vocabulary. llama.cpp stores the q/k projection rows
of each head interleaved (rotary pairs side by side); we put them back in HF's half-split order."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selfreward.cli import Parser, run_main
from selfreward.model.checkpoint import name_table, save_model
from selfreward.model.config import ModelConfig
from selfreward.records import DataError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER_NAMES = {   # GGUF blk.N.<name> -> HF model.layers.N.<name>
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PRE_TOKENIZERS = ("gpt2", "smollm")   # llama.cpp's pre-tokenizer names we can rebuild (smollm: digits split first)


def hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a name we do not know."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary reorder: per head, rows (i, pair) -> (pair half, i)."""
    return w.reshape(heads, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def read_config(meta: dict, tensors: dict, where: str) -> ModelConfig:
    """ModelConfig from the llama.* metadata; the vocabulary and tying from the tensors themselves."""
    def need(key):
        if f"llama.{key}" not in meta:
            raise DataError(f"{where}: metadata 'llama.{key}' is missing")
        return meta[f"llama.{key}"]
    if meta.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise DataError(f"{where}: rope scaling is not supported")
    heads = need("attention.head_count")
    raw = dict(model_type="llama", vocab_size=int(tensors["token_embd.weight"].shape[1]),
               hidden_size=need("embedding_length"), intermediate_size=need("feed_forward_length"),
               num_hidden_layers=need("block_count"), num_attention_heads=heads,
               num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
               head_dim=meta.get("llama.attention.key_length"), rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
               rope_theta=meta.get("llama.rope.freq_base", 10000.0), max_position_embeddings=need("context_length"),
               tie_word_embeddings="output.weight" not in tensors,
               bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return ModelConfig.from_dict({k: v for k, v in raw.items() if v is not None}, source=where)


def write_tokenizer(meta: dict, out: Path, where: str) -> None:
    """tokenizer.json (byte-level BPE), tokenizer_config.json, chat_template.jinja, generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise DataError(f"{where}: tokenizer {kind!r} (pre-tokenizer {pre!r}) is not supported "
                        f"(supported: gpt2 with pre-tokenizer {' or '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level if pre == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    # token types: 3 control (special), 4 user-defined: both must stay whole when encoding text
    tok.add_tokens([AddedToken(t, special=k == 3, normalized=False) for t, k in zip(tokens, types) if k in (3, 4)])
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    names = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and names["bos"] is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{names['bos']} $A", special_tokens=[
            (names["bos"], ids["bos"])])
    tok.save(str(out / "tokenizer.json"))
    template = meta.get("tokenizer.chat_template")
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=names["bos"], eos_token=names["eos"],
                  pad_token=names["padding"], add_bos_token=add_bos, clean_up_tokenization_spaces=False)
    if template:
        config["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))


def convert(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Read a llama GGUF file and write the HF folder `out` (atomically, via save_model)."""
    try:
        import gguf
    except ImportError:
        raise DataError("reading GGUF needs the gguf package: pip install 'selfreward[gguf]'") from None
    try:
        reader = gguf.GGUFReader(src)
    except ValueError as e:   # a bad magic number or version
        raise DataError(f"{src}: not a readable GGUF file ({e})") from None
    meta = {name: f.contents() for name, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise DataError(f"{src}: architecture {arch!r} is not supported (supported: llama)")
    tensors = {t.name: t for t in reader.tensors}
    cfg = read_config(meta, tensors, str(src))
    ours = {hf: name for name, hf in name_table(cfg).items()}
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer(meta, Path(tok_dir), str(src))   # first: an unsupported tokenizer fails fast
        state = {}
        for name, t in tensors.items():
            hf = hf_name(name)
            if hf not in ours:
                raise DataError(f"{src}: tensor {name}: not a tensor of a llama model")
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise DataError(f"{src}: tensor {name}: type {t.tensor_type.name} not supported") from None
            w = np.array(w, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
            if ".attn_q." in name or ".attn_k." in name:
                w = unpermute(w, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
            state[ours[hf]] = torch.from_numpy(w).to(dtype)
        if missing := [hf for hf, name in ours.items() if name not in state]:
            raise DataError(f"{src}: no tensor for {missing[0]} ({len(missing)} missing in all)")
        return save_model(state, cfg, out, tokenizer_dir=tok_dir, dtype=dtype)

def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("gguf_file", help="the .gguf file to read")
    p.add_argument("out", help="the Hugging Face folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written tensors")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    convert(args.gguf_file, args.out, DTYPES[args.dtype])
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
