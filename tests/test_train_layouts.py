"""Issue 32 item 3: TRL's data layouts read as they are (train/layouts.py). Each layout's rows equal the native
layout's rows written by hand; the implicit prompt is split as TRL's extract_prompt splits it (hand-computed);
gzipped JSONL, parquet and save_to_disk inputs read as their JSONL; a DPO and an SFT step run through the CLI
on conversational files with the very losses of their native twins; bad rows are `file:line: field` errors."""
from __future__ import annotations

import gzip
import json
import sys

import pytest

from cli_harness import run_cli
from test_train_fixtures import make_model, make_spm, write_jsonl
from selfreward.model.tokenizer import Tokenizer
from selfreward.records import DataError
from selfreward.train.data import load_pairs, load_sft, sft_example
from selfreward.train.layouts import pair_row, prompt_text, read_rows, sft_row, shared_prompt

SYS = {"role": "system", "content": "Be kind."}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# (TRL's layout, the native record it is, written by hand)
PAIRS = {
    "conversational": ({"prompt": [SYS, U("Tell me a story."), A("The cat sat."), U("Another one.")],
                        "chosen": [A("The dog ran.")], "rejected": [A("No.")]},
                       {"messages": [SYS, U("Tell me a story."), A("The cat sat."), U("Another one.")],
                        "chosen": "The dog ran.", "rejected": "No."}),
    "implicit conversational": ({"chosen": [U("Is the cat big?"), A("Yes, the cat is big.")],
                                 "rejected": [U("Is the cat big?"), A("Blue.")]},
                                {"messages": [U("Is the cat big?")], "chosen": "Yes, the cat is big.", "rejected": "Blue."}),
    # UltraFeedback (binarized): a prompt string and a messages column beside the whole conversations
    "implicit, UltraFeedback's columns": ({"prompt": "Is the cat big?", "prompt_id": "7", "score_chosen": 8.0,
                                           "messages": [U("Is the cat big?"), A("Yes.")],
                                           "chosen": [U("Is the cat big?"), A("Yes.")],
                                           "rejected": [U("Is the cat big?"), A("Blue.")]},
                                          {"prompt_id": "7", "score_chosen": 8.0, "messages": [U("Is the cat big?")],
                                           "chosen": "Yes.", "rejected": "Blue."}),
    "implicit string": ({"chosen": "The sky is blue.", "rejected": "The sky is green."},     # TRL's docs' example
                        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    "string": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
               {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    "reward model, conversational prompt": ({"prompt": [U("Hi.")], "response_1": "a", "response_2": "b", "label": [0.3, 0.7]},
                                            {"messages": [U("Hi.")], "response_1": "a", "response_2": "b", "label": [0.3, 0.7]}),
}
SFT = {
    "prompt / completion": ({"prompt": "Tell me a story.", "completion": "The cat sat."},
                            {"prompt": "Tell me a story.", "response": "The cat sat."}),
    "conversational prompt / completion": ({"prompt": [SYS, U("Tell me a story.")], "completion": [A("The cat sat.")]},
                                           {"messages": [SYS, U("Tell me a story."), A("The cat sat.")],
                                            "prompt_turns": 2}),
    "messages": ({"messages": [U("Hi."), A("Yes.")]}, {"messages": [U("Hi."), A("Yes.")]}),
}


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return make_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def tok(spm) -> Tokenizer:
    return Tokenizer.load(spm.parent)


@pytest.mark.parametrize("name", PAIRS)
def test_pair_layouts_are_native_rows(name, tmp_path, tok):
    trl, native = PAIRS[name]
    assert pair_row(trl, "x:1") == native
    if "chosen" in native:       # and they train on the same token sequences
        got = load_pairs([write_jsonl(tmp_path / "trl.jsonl", [trl])], tok, 96, 64)
        assert got == load_pairs([write_jsonl(tmp_path / "native.jsonl", [native])], tok, 96, 64)


@pytest.mark.parametrize("name", SFT)
def test_sft_layouts_are_native_rows(name, tok):
    trl, native = SFT[name]
    assert sft_row(trl, "x:1") == native
    ex = sft_example(sft_row(trl, "x:1"), tok, "x:1")
    if name == "conversational prompt / completion":   # no assistant turn in the prompt: the plain messages' example
        native = {"messages": native["messages"]}
    assert ex == sft_example(native, tok, "x:1")


def test_rl_prompt_layouts():
    assert prompt_text({"prompt": [U("Sort 3 1 2.")]}, "x:1") == prompt_text({"prompt": "Sort 3 1 2."}, "x:1")
    with pytest.raises(DataError, match=r"x:1: field 'prompt' should be a string or one user message"):
        prompt_text({"prompt": [SYS, U("Sort 3 1 2.")]}, "x:1")


def test_implicit_prompt_split_by_hand():
    conv_c = [SYS, U("Hi."), A("Hello."), U("Name a fruit."), A("Apple.")]
    conv_r = [SYS, U("Hi."), A("Hello."), U("Name a fruit."), A("Rock.")]
    assert shared_prompt(conv_c, conv_r) == 4                     # messages 0-3 are the prompt
    assert pair_row({"chosen": conv_c, "rejected": conv_r}, "x:1") == \
        {"messages": conv_c[:4], "chosen": "Apple.", "rejected": "Rock."}
    # "The sky is " is common (11 characters); the space before the split goes with the replies
    assert shared_prompt("The sky is blue.", "The sky is green.") == 10
    assert shared_prompt("2+2=4", "2+2=5") == 4                  # no space: the split is where they differ
    assert shared_prompt("Why? Because.", "Why? No.") == 4
    assert shared_prompt("same", "same") == shared_prompt("The sky", "The sky is") == -1   # no reply left
    assert shared_prompt("abc", "xbc") == 0


def test_multi_turn_prompt_is_context_as_transformers_renders_it(tmp_path):
    """A conversational prompt with an assistant turn: the loss is on the completion alone (TRL's
    completion-only loss); the completion is what transformers renders after the prompt's generation prompt."""
    from transformers import AutoTokenizer

    from hf_tokenizer import make_hf_tokenizer
    d = make_hf_tokenizer(tmp_path / "chatml")
    tok, hf = Tokenizer.load(d), AutoTokenizer.from_pretrained(d)
    prompt = [SYS, U("Tell me a story."), A("Once upon a time."), U("What is two plus two?")]
    completion = [A("The answer is four.")]
    ex = sft_example(sft_row({"prompt": prompt, "completion": completion}, "x:1"), tok, "x:1")
    full = hf.apply_chat_template(prompt + completion, tokenize=False)
    head = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ex.ids == hf.encode(full, add_special_tokens=False)
    assert full.startswith(head)
    reply = full[len(head):]                                         # TRL's completion: "... four.<|im_end|>\n"
    assert [t for t, m in zip(ex.ids, ex.mask) if m] == hf.encode(reply[:reply.index("<|im_end|>") + 10],
                                                                 add_special_tokens=False)
    # the same messages as a native record train on both assistant turns
    both = sft_example({"messages": prompt + completion}, tok, "x:1")
    assert sum(both.mask) > sum(ex.mask) and both.ids == ex.ids


def test_gz_parquet_and_save_to_disk_read_as_jsonl(tmp_path):
    rows = [PAIRS["conversational"][0], PAIRS["implicit conversational"][0]]
    ref = read_rows(write_jsonl(tmp_path / "p.jsonl", rows))
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    assert [r for _, r in read_rows(gz)] == [r for _, r in ref] and read_rows(gz)[1][0] == f"{gz}:2"
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a whole gzip file"):
        read_rows(cut)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(rows)       # one table: row 2's 'prompt' cell is null, an absent field
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "p_ds"))
    for p in (tmp_path / "p.parquet", tmp_path / "p_ds"):
        got = read_rows(p)
        assert [r for _, r in got] == [r for _, r in ref] and got[1][0] == f"{p}:2"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits test, train: give one split's folder"):
        read_rows(tmp_path / "dd")


def test_tables_without_datasets_say_how_to_get_it(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)       # import fails as where it is not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    for p in ("p.parquet", "ds"):
        with pytest.raises(DataError, match=rf"{p}: reading .* needs the datasets library: pip install datasets"):
            read_rows(tmp_path / p)


BAD = [
    ("pairs", {"prompt": [U("a"), A("b")], "chosen": [A("c")], "rejected": [A("d")]},
     r"field 'prompt' must end with a user turn"),
    ("pairs", {"prompt": [U("a")], "chosen": [A("c")], "rejected": "d"}, r"fields 'chosen' and 'rejected' should both"),
    ("pairs", {"prompt": [U("a")], "chosen": [A("c"), U("e")], "rejected": [A("d")]},
     r"field 'chosen' should be a string or one assistant message, got the roles \['assistant', 'user'\]"),
    ("pairs", {"prompt": [{"role": "bot", "content": "a"}], "chosen": [A("c")], "rejected": [A("d")]},
     r"field 'prompt\[0\]' must be"),
    ("pairs", {"chosen": [U("a"), A("c")], "rejected": [U("a"), A("c")]}, r"do not differ before one of them ends"),
    ("pairs", {"chosen": [U("a"), A("b"), U("c"), A("d")], "rejected": [U("a"), A("b"), U("x"), A("d")]},
     r"fields 'chosen' and 'rejected': their shared prompt \(messages 0-1\) should end with a user turn, not 'assistant'"),
    ("pairs", {"chosen": [U("a"), A("b"), U("c"), A("d")], "rejected": [U("a"), A("x"), U("c"), A("d")]},
     r"field 'chosen' should be a string or one assistant message after the prompt it shares with the other reply"),
    ("pairs", {"chosen": "abc", "rejected": "xyz"}, r"share no prompt"),
    ("pairs", {"chosen": 3, "rejected": "x"}, r"field 'chosen' should be str/list, got int"),
    ("sft", {"prompt": "a", "completion": "b", "response": "c"}, r"fields 'completion' and 'response' both given"),
    ("sft", {"prompt": [U("a")], "completion": [U("b")]}, r"field 'completion' has no assistant turn"),
    ("sft", {"prompt": 3, "completion": "b"}, r"field 'prompt' should be str/list, got int"),
    ("sft", {"messages": [U("a"), A("b")], "prompt_turns": 2}, r"field 'prompt_turns' should be in \[0, 2\)"),
]


@pytest.mark.parametrize("kind,rec,msg", BAD)
def test_bad_rows_name_file_line_and_field(kind, rec, msg, tmp_path, tok):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"} if kind == "pairs" else {"text": "ok"}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, rec])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*({msg})"):
        load_pairs([p], tok, 64, 32) if kind == "pairs" else load_sft([p], tok, 64)


def _first_loss(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("trainer", ["dpo", "sft"])
def test_a_step_on_a_conversational_file_through_the_cli(trainer, tmp_path, spm):
    """The conversational file trains as its native twin: the same first-step loss, to the bit."""
    model = make_model(tmp_path / "m0", spm)
    if trainer == "dpo":
        pairs = [PAIRS["conversational"], PAIRS["implicit conversational"]] * 2
    else:
        pairs = [SFT["conversational prompt / completion"], SFT["prompt / completion"]] * 2
    losses = {}
    for side, rows in (("trl", [t for t, _ in pairs]), ("native", [n for _, n in pairs])):
        out = tmp_path / f"run_{side}"
        code, err = run_cli(trainer, ["--model", model, "--data", write_jsonl(tmp_path / f"{side}.jsonl", rows),
                                      "--output", out, "--max-steps", "1", "--batch-size", "4", "--max-length",
                                      "64", "--dropout", "0"])
        assert code == 0, err
        losses[side] = _first_loss(out)
    assert losses["trl"] == losses["native"]


def test_a_bad_row_through_the_cli_is_an_error_line(tmp_path, spm):
    model = make_model(tmp_path / "m0", spm)
    data = write_jsonl(tmp_path / "bad.jsonl", [PAIRS["conversational"][0], BAD[0][1]])
    code, err = run_cli("dpo", ["--model", model, "--data", data, "--output", tmp_path / "run", "--max-steps", "1",
                                "--batch-size", "2", "--max-length", "64"])
    assert code == 2 and f"error: {data}:2: field 'prompt' must end with a user turn" in err, err
    assert "Traceback" not in err


def test_a_save_to_disk_folder_is_hashed_for_resume(tmp_path):
    """A folder --data shapes the run as a file does: its hash is in run.json, so a resume on changed data is
    refused; the same rows in another folder hash the same, other rows differently."""
    datasets = pytest.importorskip("datasets")
    from selfreward.provenance import made_by
    from selfreward.train.dpo import DPOConfig
    for name, rows in (("a", [PAIRS["string"][0]]), ("b", [PAIRS["string"][0]]), ("c", [PAIRS["string"][1]] * 2)):
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / name))
    (tmp_path / "plain").mkdir()
    h = {n: made_by(DPOConfig(data=[str(tmp_path / n)]))["data_hashes"][0] for n in ("a", "b", "c", "plain")}
    assert h["a"] == h["b"] != h["c"] and h["a"] and h["plain"] == ""
