"""Issue 32, item 5: `--config` reads YAML as well as JSON, takes KEY=VALUE overrides after the file (each checked
as its flag), and a TRL user's spellings are taken (`--max_steps`) or answered with ours (`--learning_rate`).
The reference for each config is the same settings given as flags."""
from __future__ import annotations

import json

import pytest

from cli_harness import run_cli
from selfreward import cli
from selfreward.recipes.loop_config import LOOP_SET, LoopConfig
from selfreward.train.sft import SFTConfig


def parse(cls, argv, skip=None):
    return cli.build(cls, cli.parser(cls, skip=skip).parse_args([str(a) for a in argv]))


YAML = """\
# an SFT run
lr: 1e-5            # YAML 1.1 reads this as text; we read it as the number
max_steps: 3
data: [a.jsonl, b.jsonl]
shuffle: false
"""
FLAGS = ["--lr", "1e-5", "--max-steps", "3", "--data", "a.jsonl", "b.jsonl", "--no-shuffle"]


def test_yaml_and_json_give_what_the_flags_give(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-5, "max_steps": 3, "data": ["a.jsonl", "b.jsonl"],
                                                 "shuffle": False}))
    want = parse(SFTConfig, FLAGS)
    assert want.lr == 1e-5 and want.data == ["a.jsonl", "b.jsonl"]
    assert parse(SFTConfig, ["--config", tmp_path / "c.yaml"]) == want
    assert parse(SFTConfig, ["--config", tmp_path / "c.json"]) == want


def test_nested_yaml_and_overrides_by_dotted_or_flag_names(tmp_path):
    (tmp_path / "loop.yml").write_text("engine:\n  dtype: bfloat16\njudge:\n  k: 5\ndpo:\n  beta: 0.2\n")
    got = parse(LoopConfig, ["--config", tmp_path / "loop.yml", "judge.k=7", "dpo-beta=0.3", "candidates.n=6",
                             "--candidates-n", "8"], LOOP_SET)
    want = parse(LoopConfig, ["--engine-dtype", "bfloat16", "--judge-k", "7", "--dpo-beta", "0.3",
                              "--candidates-n", "8"], LOOP_SET)
    assert got == want and got.judge.k == 7 and got.candidates.n == 8   # a flag wins over an override
    (tmp_path / "s.yaml").write_text(YAML)
    assert parse(SFTConfig, ["--config", tmp_path / "s.yaml", "data=x.jsonl,y.jsonl", "shuffle=true", "lr=2e-5"]) \
        == parse(SFTConfig, ["--lr", "2e-5", "--max-steps", "3", "--data", "x.jsonl", "y.jsonl", "--shuffle"])


@pytest.mark.parametrize("name,text,says", [
    ("bad.yaml", "lr: 1e-5\nmax_steps 3\n  epochs: 2\n", "bad.yaml:3: could not find expected ':'"),
    ("bad.json", '{"lr": 1e-5,\n "max_steps": }\n', "bad.json:2: Expecting value (column 15)"),
    ("list.yaml", "- lr: 1\n", "list.yaml: expected a mapping of settings (key: value), got a list"),
    ("typo.yaml", "max_step: 3\n", "unknown field 'max_step' for SFTConfig; did you mean 'max_steps'?"),
    ("text.yaml", "lr: fast\n", "field 'lr': 'fast' is not a number"),
    ("bool.json", '{"shuffle": "no"}', "field 'shuffle': 'no' is not true or false"),
])
def test_a_bad_file_names_its_line_or_field(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    code, err = run_cli("sft", ["--config", tmp_path / name])
    assert code == 2 and err.startswith("error: ") and says in err and "Traceback" not in err


@pytest.mark.parametrize("item,says", [
    ("max_step=3", "max_step=3: unknown setting 'max_step'; did you mean 'max_steps'?"),
    ("lr=fast", "lr=fast: invalid float value: 'fast'"),
    ("lr=-1", "lr=-1: --lr -1: must be > 0"),
    ("schedule=square", "schedule 'square': choose one of cosine, linear"),
    ("shuffle=maybe", "shuffle=maybe: expected true or false"),
    ("lr", "lr: expected KEY=VALUE"),
])
def test_each_override_is_checked_like_its_flag(tmp_path, item, says):
    (tmp_path / "c.yaml").write_text("max_steps: 3\n")
    code, err = run_cli("sft", ["--config", tmp_path / "c.yaml", item])
    assert code == 2 and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,says", [
    (["--learning_rate", "1e-5"], "error: --learning_rate: this is TRL's name; ours is --lr"),
    (["--output_dir=runs/x"], "error: --output_dir: this is TRL's name; ours is --output"),
    (["--num_train_epochs", "2"], "ours is --epochs"),
    (["--per_device_train_batch_size", "4"], "ours is --micro-batch-size (examples per forward per rank), with "
     "--batch-size (the GLOBAL batch) = --micro-batch-size x accumulation x world size"),
    (["--gradient_accumulation_steps", "4"], "here accumulation follows from --batch-size (the GLOBAL batch)"),
    (["--lrr", "1e-5"], "unrecognized arguments: --lrr 1e-5; did you mean '--lr'?"),
])
def test_trl_names_are_answered_with_ours(argv, says):
    code, err = run_cli("sft", argv)
    assert code == 2 and says in err and "Traceback" not in err, err


def test_underscored_flags_are_ours():
    assert parse(SFTConfig, ["--max_steps", "3", "--weight_decay=0.1", "--micro_batch_size", "2"]) == \
        parse(SFTConfig, ["--max-steps", "3", "--weight-decay", "0.1", "--micro-batch-size", "2"])


def test_help_says_the_batch_is_global():
    code, _, out = run_cli("dpo", ["--help"], stdout=True)
    flat = " ".join(out.split())
    assert code == 0 and "--batch-size BATCH_SIZE GLOBAL batch" in flat and "TRL's per_device_train_batch_size" in flat
    assert "--config FILE [KEY=VALUE ...]" in flat
