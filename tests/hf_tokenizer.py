"""A tiny HF `tokenizer.json` tokenizer (byte-level BPE trained here) with a ChatML-style chat template,
saved by transformers itself: the fixture for the tokenizer.json + chat_template code paths."""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["Tell me a story about a cat.", "Once upon a time there was a dog.", "What is two plus two?",
          "The answer is four.", "Be brief and kind.", "Sort these numbers: 3 1 2"] * 20


def make_hf_tokenizer(out: Path, template: str | None = CHATML, vocab: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|end|>"])
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(out)
    return Path(out)
