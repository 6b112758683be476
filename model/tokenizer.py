"""Tokenizers of Hugging Face checkpoint folders, chat rendering, and the assistant-target mask (README.md,
"Tokens and chat": the templates). Two backends: SentencePiece (`tokenizer.model`, Llama 2) and HF `tokenizers`
(`tokenizer.json`, Llama 3 / Mistral / Qwen2); special tokens from `tokenizer_config.json` (else the
SentencePiece model's own ids), stop ids also from `generation_config.json`. Each message's pieces (header,
content, trailer) are encoded on their own, so render_chat(prompt, add_generation_prompt=True)[0] +
render_response(reply) == render_chat(prompt + [reply])[0] by construction (for SentencePiece this can differ
from encoding the whole rendered string at a segment boundary: we choose consistency across our own stages).
"""

import re
from pathlib import Path

from selfreward.records import DataError, read_json

# The plain template, used when a checkpoint has no chat_template:
#   <bos>System: {system}\n\nUser: {user}\n\nAssistant: {assistant}<eos>User: {user}\n\nAssistant: ...
PLAIN_HEADERS = {"system": "System: {}\n\n", "user": "User: {}\n\n"}
PLAIN_ASSISTANT = "Assistant:"   # the reply follows; SentencePiece's dummy prefix supplies the space
ROLES = ("system", "user", "assistant")
# The same as jinja, what exports carry (model/README.md, "Exports"): SEP stands for the space a SentencePiece-style
# tokenizer's dummy prefix puts before each segment render_chat encodes on its own (none after BOS / EOS).
_C = "{{ m['content'] }}"
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(text=false) %}{% for m in messages %}{% if ns.text %}SEP{% endif %}"
    "{% if m['role'] == 'assistant' %}" + PLAIN_ASSISTANT + "SEP" + _C + "{{ eos_token }}{% set ns.text = false %}"
    "{% elif m['role'] == 'system' %}" + PLAIN_HEADERS["system"].format(_C) + "{% set ns.text = true %}"
    "{% else %}" + PLAIN_HEADERS["user"].format(_C) + "{% set ns.text = true %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if ns.text %}SEP{% endif %}" + PLAIN_ASSISTANT + "{% endif %}")


def check_messages(msgs, where: str, name: str = "messages") -> list[dict]:
    """A chat record's `messages` (or the field `name`): a non-empty list of {'role': system|user|assistant,
    'content': str}; the error names `where` (file:line) and the field."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{name}' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{name}[{j}]' must be {{'role': {'|'.join(ROLES)}, "
                            f"'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class TokenizerError(DataError):
    pass


def _token_text(v) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        self.config = read_json(path / "tokenizer_config.json", error=TokenizerError)
        self._hf = self._sp = None
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:   # the tokenizers library raises a bare Exception for a bad file
                raise TokenizerError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif (path / "tokenizer.model").exists():
            import sentencepiece as spm
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except (RuntimeError, OSError) as e:
                raise TokenizerError(f"{path / 'tokenizer.model'}: not a readable SentencePiece model ({e})") from None
            self.vocab_size = self._sp.vocab_size()
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
        self.bos_id = self._special("bos_token", self._sp.bos_id() if self._sp else None)
        self.eos_id = self._special("eos_token", self._sp.eos_id() if self._sp else None)
        pad = self._special("pad_token", self._sp.pad_id() if self._sp else None)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        e = read_json(path / "generation_config.json").get("eos_token_id")   # an id or a list: stop ids too
        gen = [e] if isinstance(e, int) else (e or [])
        self.stop_ids = list(dict.fromkeys(([] if self.eos_id is None else [self.eos_id]) + gen))
        t = self.config.get("chat_template")
        if isinstance(t, list):   # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t}
            t = named.get("default") or next(iter(named.values()), None)
        jinja = path / "chat_template.jinja"
        self.chat_template = jinja.read_text() if jinja.exists() else t
        self._where = jinja if jinja.exists() else path / "tokenizer_config.json"
        if self.chat_template in (PLAIN_TEMPLATE.replace("SEP", " "), PLAIN_TEMPLATE.replace("SEP", "")):
            self.chat_template = None     # an export's plain template: rendered by the plain path, as in training
        self._template = self._compile() if self.chat_template is not None else None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(path)

    def _special(self, key: str, fallback: int | None) -> int | None:
        text = _token_text(self.config.get(key))
        if text is None:
            return fallback if (fallback is not None and fallback >= 0) else None
        if self._hf is not None:
            tid = self._hf.token_to_id(text)
        else:
            tid = self._sp.piece_to_id(text)
            tid = None if tid == self._sp.unk_id() and text != self._sp.id_to_piece(tid) else tid
        if tid is None:
            raise TokenizerError(f"{self.path / 'tokenizer_config.json'}: field '{key}': token {text!r} "
                                 f"is not in the vocabulary")
        return tid

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text -> ids. Special-token strings in the text (e.g. "<s>" written by a chat template) map to
        their ids, as HF tokenizers do for its added tokens."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp_encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i is not None}
        if not any(sp in text for sp in specials):
            return self._sp.encode(text)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens (BOS, EOS, pad, control tokens) left out."""
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self._sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)])

    def token(self, i: int) -> str:
        return self._hf.id_to_token(i) if self._hf is not None else self._sp.id_to_piece(i)

    def plain_template(self) -> str:
        """The plain template as jinja, its SEP a space where this tokenizer encodes "x" twice as "x x"."""
        return PLAIN_TEMPLATE.replace("SEP", " " if self.decode(self.encode("x") * 2) == "x x" else "")

    def _compile(self):
        import jinja2
        from selfreward.model.chat_template import environment
        try:
            return environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{self._where}: chat template: line {e.lineno}: {e.message}") from None

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2
        extra = {k: _token_text(v) for k, v in self.config.items()
                 if k.endswith("_token") and isinstance(_token_text(v), str)}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.TemplateError as e:    # raise_exception's message, a sandbox refusal, ...
            raise TokenizerError(f"{self._where}: chat template: {e}") from None

    def _segments(self, messages: list[dict], add_generation_prompt: bool):
        """-> [(text, kind)]: kind True marks an assistant reply, None the closing text of an assistant turn
        (its end token is a target), False the rest."""
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise TokenizerError(f"message {i}: field 'role': {m.get('role')!r} is not system/user/assistant")
            if not isinstance(m.get("content"), str):
                raise TokenizerError(f"message {i}: field 'content': missing or not a string")
        if self.chat_template is None:
            segs = []
            for m in messages:
                if m["role"] == "assistant":
                    segs += [(PLAIN_ASSISTANT, False), (m["content"], True)]
                else:
                    segs.append((PLAIN_HEADERS[m["role"]].format(m["content"]), False))
            if add_generation_prompt:
                segs.append((PLAIN_ASSISTANT, False))
            return segs
        # A jinja template: find each message's text by rendering growing prefixes of the conversation.
        segs, done = [], ""
        for i, m in enumerate(messages):
            asst = m["role"] == "assistant"
            full = self._render(messages[:i + 1], add_generation_prompt=False)
            head = self._render(messages[:i], add_generation_prompt=True) if asst else full
            if not head.startswith(done) or not full.startswith(head):
                raise TokenizerError(f"{self.path}: chat_template does not render conversations as growing prefixes"
                                     + (f"; cannot locate assistant turn {i}" if asst else f" (message {i})"))
            if not asst:
                segs.append((full[len(done):], False))
            else:
                rest = full[len(head):]
                at = rest.find(m["content"])
                if at < 0:
                    raise TokenizerError(f"{self.path}: chat_template alters assistant content of turn {i}")
                segs += [(head[len(done):] + rest[:at], False), (m["content"], True),
                         (rest[at + len(m["content"]):], None)]
            done = full
        if add_generation_prompt:
            segs.append((self._render(messages, add_generation_prompt=True)[len(done):], False))
        return segs

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Chat turns -> (ids, target_mask). The mask is True on assistant content tokens and on the token
        that ends each assistant turn (EOS, or the template's end-of-turn token): what SFT trains on."""
        plain = self.chat_template is None
        ids, mask = ([self.bos_id], [False]) if plain and self.bos_id is not None else ([], [])
        for text, kind in self._segments(messages, add_generation_prompt):
            piece = self.encode(text) if text else []
            if kind is True and plain and self.eos_id is not None:   # the plain template ends a reply with EOS
                piece.append(self.eos_id)
            if kind is None:     # closing text of an assistant turn: targets up to its first stop id
                n = next((j + 1 for j, t in enumerate(piece) if t in self.stop_ids), 0)
            else:
                n = len(piece) if kind else 0
            ids += piece
            mask += [True] * n + [False] * (len(piece) - n)
        return ids, mask

    def render_response(self, text: str) -> list[int]:
        """Ids of an assistant reply as render_chat lays it after the generation prompt, end token included
        (plain template: content + EOS; a jinja template: content + its closing text up to the stop id)."""
        ids, mask = self.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": text}])
        return [t for t, m in zip(ids, mask) if m]     # the mask is True on the reply's tokens alone

    def user_ids(self, text: str, system: str | None = None) -> list[int]:
        """One user turn (after a system turn when given) with the generation prompt: every one-turn prompt."""
        turns = [{"role": "system", "content": system}] if system is not None else []
        return self.render_chat(turns + [{"role": "user", "content": text}], add_generation_prompt=True)[0]

    def prompt_ids(self, record: dict, raw: bool = False) -> list[int]:
        """A request record's prompt ids: `messages` rendered with the generation prompt; a `prompt` string
        as one user turn, as the trainers read `{"prompt"}` records (raw=True: BOS + the text, no template)."""
        if "messages" in record:
            return self.render_chat(record["messages"], add_generation_prompt=True)[0]
        return self.encode(record["prompt"], bos=True) if raw else self.user_ids(record["prompt"])
