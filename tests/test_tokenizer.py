"""Tokenizers (SentencePiece and tokenizer.json), chat rendering against transformers, the target mask."""
import json

import pytest

from selfreward.model.tokenizer import Tokenizer, TokenizerError
from hf_tokenizer import make_hf_tokenizer

CHAT = [{"role": "system", "content": "Be brief and kind."},
        {"role": "user", "content": "Tell me a story about a cat."},
        {"role": "assistant", "content": "Once upon a time there was a dog."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "The answer is four."}]


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def _targets(tok, ids, mask):
    return [i for i, m in zip(ids, mask) if m]


def test_chat_template_matches_transformers(tmp_path):
    import transformers as tf
    d = make_hf_tokenizer(tmp_path / "tok")
    ours, hf = Tokenizer.load(d), tf.AutoTokenizer.from_pretrained(d)
    ids, mask = ours.render_chat(CHAT)
    assert ids == _ids(hf.apply_chat_template(CHAT, tokenize=True))
    gen, _ = ours.render_chat(CHAT[:4], add_generation_prompt=True)
    assert gen == _ids(hf.apply_chat_template(CHAT[:4], tokenize=True, add_generation_prompt=True))
    # targets: exactly each reply's tokens followed by its end-of-turn token <|im_end|>
    end = hf.convert_tokens_to_ids("<|im_end|>")
    want = (hf.encode(CHAT[2]["content"], add_special_tokens=False) + [end]
            + hf.encode(CHAT[4]["content"], add_special_tokens=False) + [end])
    assert _targets(ours, ids, mask) == want
    # prompt ids + response ids are a prefix of the whole conversation's ids
    resp = ours.render_response(CHAT[4]["content"])
    assert ids[:len(gen) + len(resp)] == gen + resp
    assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id and ours.pad_id == hf.pad_token_id


def test_tokenizer_json_encode_decode_matches_transformers(tmp_path):
    import transformers as tf
    d = make_hf_tokenizer(tmp_path / "tok", template=None)
    ours, hf = Tokenizer.load(d), tf.AutoTokenizer.from_pretrained(d)
    text = "Sort these numbers: 3 1 2 and tell me a story."
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = ours.encode(text, bos=True, eos=True)
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id
    assert ours.decode(ids) == text
    assert ours.chat_template is None   # plain template in use


def test_plain_template_sentencepiece(sp_tokenizer):
    tok = Tokenizer.load(sp_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    ids, mask = tok.render_chat(CHAT)
    assert ids[0] == tok.bos_id and not mask[0]
    # the plain template, written out, encodes to the same ids segment by segment
    head = tok.encode("System: Be brief and kind.\n\n") + tok.encode("User: Tell me a story about a cat.\n\n")
    assert ids[1:1 + len(head)] == head
    reply = tok.encode(CHAT[2]["content"]) + [tok.eos_id]
    start = 1 + len(head) + len(tok.encode("Assistant:"))
    assert ids[start:start + len(reply)] == reply and all(mask[start:start + len(reply)])
    assert sum(mask) == len(reply) + len(tok.encode(CHAT[4]["content"])) + 1
    gen, _ = tok.render_chat(CHAT[:4], add_generation_prompt=True)
    assert ids == gen + tok.render_response(CHAT[4]["content"])
    assert tok.decode(_targets(tok, ids, mask)) == "Once upon a time there was a dog. The answer is four."


def test_sentencepiece_with_jinja_template(tmp_path, sp_tokenizer):
    import shutil
    d = tmp_path / "sp"
    d.mkdir()
    shutil.copy(sp_tokenizer / "tokenizer.model", d)
    tmpl = "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": tmpl}))
    tok = Tokenizer.load(d)
    ids, mask = tok.render_chat(CHAT[1:3])
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2   # "<s>" text became the BOS id
    assert tok.decode(_targets(tok, ids, mask)).strip() == CHAT[2]["content"]
    assert _targets(tok, ids, mask)[-1] == tok.eos_id


def test_prompt_ids_raw_and_messages(sp_tokenizer):
    tok = Tokenizer.load(sp_tokenizer)
    assert tok.prompt_ids({"prompt": "Once"}, raw=True) == [tok.bos_id] + tok.encode("Once")
    assert tok.prompt_ids({"prompt": ""}, raw=True) == [tok.bos_id]
    # by default a "prompt" is one user turn, as the trainers read it
    user = [{"role": "user", "content": "Once"}]
    assert tok.prompt_ids({"prompt": "Once"}) == tok.render_chat(user, add_generation_prompt=True)[0]
    assert tok.prompt_ids({"messages": CHAT[:2]}) == tok.render_chat(CHAT[:2], add_generation_prompt=True)[0]


def test_bad_messages_and_folders(tmp_path, sp_tokenizer):
    tok = Tokenizer.load(sp_tokenizer)
    with pytest.raises(TokenizerError, match="message 1: field 'role'"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(TokenizerError, match="message 0: field 'content'"):
        tok.render_chat([{"role": "user"}])
    (tmp_path / "none").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.load(tmp_path / "none")
    d = make_hf_tokenizer(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|nope|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: field 'eos_token'"):
        Tokenizer.load(d)


def test_generation_config_adds_stop_ids(tmp_path):
    d = make_hf_tokenizer(tmp_path / "tok")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    assert Tokenizer.load(d).stop_ids == [4, 2]


# Templates transformers renders (its _compile_jinja_template environment): `{% break %}`, `strftime_now` as
# Llama 3.2 uses it, `tojson` with non-ASCII and HTML characters (and its keyword arguments), `{% generation %}`.
CHATML_TURN = "<|im_start|>{{ m['role'] }}\n{{ CONTENT }}<|im_end|>\n"
ENV_TEMPLATES = {
    "break": "{{ bos_token }}{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}" + CHATML_TURN
             + "{% endfor %}",
    "strftime_now": "{% if strftime_now is defined %}{% set day = strftime_now('%d %b %Y') %}{% else %}"
                    "{% set day = '26 Jul 2024' %}{% endif %}{{ bos_token }}<|im_start|>system\nToday Date: {{ day }}"
                    "<|im_end|>\n{% for m in messages %}" + CHATML_TURN + "{% endfor %}",
    "tojson": "{{ bos_token }}{{ {'z': 'é<&>', 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}\n"
              "{% for m in messages %}" + CHATML_TURN.replace("{{ CONTENT }}", "{{ m['content'] | tojson }}") + "{% endfor %}",
    "generation": "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                  "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                  "<|im_end|>{% endif %}\n{% endfor %}",
}
ODD = [{"role": "system", "content": "Answer <b>briefly</b> & kindly."},
       {"role": "user", "content": "Is 1 < 2? \"Ünïcödé\" ☃"},
       {"role": "assistant", "content": "Yes: 1 < 2 — sí"},
       {"role": "user", "content": "And 3 > 2?"},
       {"role": "assistant", "content": "Also yes."}]


@pytest.mark.parametrize("name", list(ENV_TEMPLATES))
def test_template_environment_renders_as_transformers(tmp_path, name):
    import transformers as tf
    d = make_hf_tokenizer(tmp_path / "tok")
    (d / "chat_template.jinja").write_text(ENV_TEMPLATES[name].replace("{{ CONTENT }}", "{{ m['content'] }}")
                                           + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ours, hf = Tokenizer.load(d), tf.AutoTokenizer.from_pretrained(d)
    for msgs, gen in ((ODD, False), (ODD[:4], True), (ODD[1:3], False)):
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours._render(msgs, gen) == text
        if name != "break":   # break cuts the conversation: no growing prefixes to find the turns in
            assert ours.render_chat(msgs, gen)[0] == hf(text, add_special_tokens=False)["input_ids"]
    if name == "strftime_now":
        import datetime
        assert datetime.date.today().strftime("%d %b %Y") in text


def test_template_errors_are_one_line(tmp_path):
    import transformers as tf
    from cli_harness import run_cli
    from hf_tiny import make_hf_checkpoint
    d = make_hf_tokenizer(make_hf_checkpoint(tmp_path / "m", vocab=320, hidden=32, intermediate=64))
    (d / "chat_template.jinja").write_text("{% if messages[0]['role'] != 'user' %}"
                                           "{{ raise_exception('the first turn must be the user') }}{% endif %}")
    with pytest.raises(Exception, match="the first turn must be the user"):      # jinja2.TemplateError there
        tf.AutoTokenizer.from_pretrained(d).apply_chat_template(CHAT, tokenize=False)
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: chat template: the first turn must be the user"):
        Tokenizer.load(d).render_chat(CHAT)
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    code, err = run_cli("sft", ["--model", d, "--data", data, "--output", tmp_path / "run"])
    assert code == 2 and err.strip() == f"error: {d / 'chat_template.jinja'}: chat template: line 2: unexpected '}}'"
