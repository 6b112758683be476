"""The tokenizer files of an export (model/README.md, "Exports"): the tokenizer folder's files copied, then
completed so that transformers (and vLLM) read the export as it was trained:
- tokenizer.json, converted from a bare SentencePiece tokenizer.model by transformers' own converter: a fresh
  transformers 5 reads tokenizer.model only with protobuf and sentencepiece installed, and through the class
  tokenizer_config.json names (LlamaTokenizer rebuilds its own pipeline, which can tokenize differently);
- tokenizer_config.json with `tokenizer_class` (PreTrainedTokenizerFast where it names none or the conversion
  made tokenizer.json), the special tokens, `pad_token` where config.json has a pad_token_id (the reward model)
  and `chat_template`: the one training used, or the built-in plain one for a base model;
- chat_template.jinja, the same template (transformers 5 reads it first)."""

import json
import shutil
import warnings
from pathlib import Path

from selfreward.model.tokenizer import Tokenizer

COPIED = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json", "chat_template.jinja")
FAST = "PreTrainedTokenizerFast"    # the class that reads tokenizer.json as it is


def write_tokenizer(src: str | Path, out: Path, pad_token_id: int | None = None) -> None:
    src = Path(src)
    for name in COPIED:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    if not any((src / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        return
    tok = Tokenizer.load(src)     # the training tokenizer: its special ids, template, separator
    converted = not (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()
    if converted:
        try:
            from transformers import PreTrainedTokenizerFast
            PreTrainedTokenizerFast.from_pretrained(out).backend_tokenizer.save(str(out / "tokenizer.json"))
        except Exception as e:   # an older transformers, without protobuf: the export still loads here
            warnings.warn(f"{out}: tokenizer.json not written ({e}); transformers will need sentencepiece and "
                          f"protobuf to read tokenizer.model")
            converted = False
    cfg = dict(tok.config)
    template = tok.chat_template or tok.plain_template()
    if not isinstance(cfg.get("chat_template"), list):   # named templates stay as they are
        cfg["chat_template"] = template
    if (out / "tokenizer.json").exists() and (converted or "tokenizer_class" not in cfg):
        cfg["tokenizer_class"] = FAST
    for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", pad_token_id)):
        if cfg.get(key) is None and tid is not None:
            cfg[key] = tok.token(tid)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(template)
