"""Verifiable instructions (issue 29, recipes/verifiable.py): every IFEval type of if-verifiable classified offline
or needing nltk data, strict prompt-level verdicts by the library on responses whose truth is plain, attach()'s
determinism and conflicts, accuracy and its SE, the `ifeval` reward, the builder CLI. Skipped without
if-verifiable (the `real` extra)."""
import json
import math
import random

import pytest

pytest.importorskip("if_verifiable")

from selfreward.cli import ConfigError                                      # noqa: E402
from selfreward.records import DataError, read_jsonl                        # noqa: E402
from selfreward.recipes import verifiable as V                              # noqa: E402
from selfreward.recipes.oasst import kept, load_messages, split_groups      # noqa: E402
from selfreward.train.rl import RLConfig, reward_factory                    # noqa: E402
from conftest import OASST_20                                               # noqa: E402

SAMPLES = ["hello world, this is a short answer in plain english.", "HELLO WORLD. THIS IS AN ANSWER IN ENGLISH.",
           "Land is good.\n\nSecond one.\n\n***\n\nThird. Fourth!", '"a quoted answer"', '{"a": 1}',
           "<<Title>>\n* one\n* two\nSECTION 1\nx\nSECTION 2\ny\nP.S. bye", "one ******\ntwo", "Write a poem. Here."]
LOWER = {"id": "a", "prompt": "Say hi.\n\nYour entire response should be in English, and in all lowercase letters.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
TWO = {"id": "b", "prompt": "Say hi. (lowercase, no commas)",
       "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]}


def test_every_type_is_classified_and_the_offline_ones_run():
    known = set(V.registry()[0])
    assert set(V.OFFLINE) | set(V.NEEDS_NLTK_DATA) == known and not set(V.OFFLINE) & set(V.NEEDS_NLTK_DATA)
    assert len(V.OFFLINE) == len(set(V.OFFLINE)) == 23
    for iid in V.OFFLINE:
        for seed in range(3):
            text, kwargs = V.describe(iid, random.Random(seed), "Write a poem.")
            assert text and json.loads(json.dumps(kwargs)) == kwargs
            checker = V.registry()[0][iid](iid)
            checker.build_description(**kwargs)
            assert all(isinstance(checker.check_following(s), bool) for s in SAMPLES), iid


def test_the_excluded_types_need_nltk_data():
    nltk = pytest.importorskip("nltk")
    for res in ("tokenizers/punkt_tab", "tokenizers/punkt"):
        try:
            nltk.data.find(res)
            pytest.skip(f"nltk data {res} is installed here: the excluded types would run")
        except LookupError:
            pass
    for iid in V.NEEDS_NLTK_DATA:
        checker = V.registry()[0][iid](iid)
        checker.build_description()
        with pytest.raises(LookupError):
            checker.check_following(SAMPLES[0])


def test_strict_ok_on_plain_cases():
    assert V.strict_ok(LOWER, "hello world, this is a short answer in plain english.")
    assert not V.strict_ok(LOWER, "Hello World, this is a short answer in plain English.")
    assert not V.strict_ok(LOWER, "")
    assert V.strict_ok(TWO, "hello world this is a short answer in plain english.")
    assert not V.strict_ok(TWO, "hello world, this is a short answer in plain english.")    # a comma: one fails
    kw = {"id": "c", "prompt": "Fruit?", "instruction_id_list": ["keywords:existence", "startend:quotation"],
          "kwargs": [{"keywords": ["apple"]}, {}]}
    assert V.strict_ok(kw, '"An apple a day."') and not V.strict_ok(kw, "An apple a day.")
    with pytest.raises(DataError, match="does not have"):
        V.strict_ok({**LOWER, "instruction_id_list": ["change_case:klingon"]}, "hello")


def test_attach_is_seeded_and_avoids_conflicts():
    prompts = [{"id": str(i), "prompt": f"Tell me about topic {i}."} for i in range(60)]
    state = random.getstate()
    a, b = V.attach(prompts, random.Random(7)), V.attach(prompts, random.Random(7))
    assert random.getstate() == state                       # the library's global draws are put back
    assert a == b and a != V.attach(prompts, random.Random(8))
    conflicts, lens = V.registry()[1], set()
    for p, r in zip(prompts, a):
        ids = r["instruction_id_list"]
        lens.add(len(ids))
        assert r["id"] == p["id"] and r["prompt"].startswith(p["prompt"] + "\n\n") and len(r["kwargs"]) == len(ids)
        assert set(ids) <= set(V.OFFLINE)
        assert not any(y in conflicts[x] for x in ids for y in ids if x != y)
        for iid, kw in zip(ids, r["kwargs"]):                 # the kwargs rebuild the text the prompt states
            assert V.registry()[0][iid](iid).build_description(**kw) in r["prompt"]
    assert lens == {1, 2}


def test_accuracy_and_se():
    recs = [LOWER] * 4
    good, bad = "hello world, this is a short answer in plain english.", "Hello World."
    p, se, _ = V.accuracy(recs, [good, good, good, bad])
    assert p == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert V.accuracy(recs[:2], [good, good])[:2] == (1.0, 0.0)
    with pytest.raises(ValueError):
        V.accuracy(recs, [good])


def test_reward_factory(tmp_path):
    assert reward_factory("ifeval") is V.reward
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (LOWER, TWO)))
    good, comma = "hello world this is a short answer in plain english.", "hello, world"
    for template in (str(path), [LOWER, TWO]):
        score = V.reward(None, template=template)
        assert score([LOWER["prompt"], TWO["prompt"], TWO["prompt"]], [good, good, comma]) == [1.0, 1.0, 0.0]
        assert score([LOWER["prompt"]], ["Hello"]) == [0.0]
        with pytest.raises(ValueError, match="in no record"):
            score(["another prompt"], [good])
    with pytest.raises(ConfigError, match="--reward-template"):
        V.reward(None)
    with pytest.raises(ConfigError, match="--reward-template"):                 # train/rl.py's door, before a model
        RLConfig(model="m", data=["d"], output="o", reward="ifeval").check()
    # the partial reward: the share of the prompt's instructions followed (hand-counted: "hello, world" is
    # lowercase with a comma, 1 of TWO's 2; "Hello" follows LOWER's 0 of 1)
    assert reward_factory("ifeval-partial") is V.partial_reward
    part = V.partial_reward(None, template=[LOWER, TWO])
    assert part([LOWER["prompt"], TWO["prompt"], TWO["prompt"], LOWER["prompt"]],
                [good, good, comma, "Hello"]) == [1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match="--reward ifeval-partial needs --reward-template"):
        RLConfig(model="m", data=["d"], output="o", reward="ifeval-partial").check()
    clash = {**LOWER, "instruction_id_list": ["punctuation:no_comma"]}
    with pytest.raises(ValueError, match="other instructions"):
        V.reward(None, template=[LOWER, clash])


def test_builder_cli(tmp_path, capsys):
    out = tmp_path / "ifeval"
    counts = V.main(["--oasst", str(OASST_20), "--out", str(out), "--held-out", "12", "--seed", "3"])
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    roots = load_messages(OASST_20)
    tr, ho = split_groups(roots, 0.25, 3, lambda r: r.id)             # recipes.oasst's split with the same seed
    assert {r["id"] for r in train} == {r.id for r in tr if kept(r, "en")}
    assert {r["id"].split(":")[0] for r in held} == {r.id for r in ho if kept(r, "en")}
    assert len(held) >= 12 and len({r["prompt"] for r in held}) == len(held)
    assert (counts["train"], counts["heldout"]) == (len(train), len(held))
    again = tmp_path / "again"
    V.main(["--oasst", str(OASST_20), "--out", str(again), "--held-out", "12", "--seed", "3"])
    assert (again / "heldout.jsonl").read_text() == (out / "heldout.jsonl").read_text()
    V.check_records(train + held, "built")
    with pytest.raises(ConfigError, match="--held-out"):
        V.main(["--oasst", str(OASST_20), "--out", str(tmp_path / "x"), "--held-out", "0"])


def test_train_draws(tmp_path):
    """--train-draws 3: every training prompt drawn up to three times (ids P, P:1, P:2), each item's text its own;
    the first round is the one --train-draws 1 writes, and no held-out tree's prompt enters training."""
    one, three = tmp_path / "one", tmp_path / "three"
    V.main(["--oasst", str(OASST_20), "--out", str(one), "--held-out", "4"])
    V.main(["--oasst", str(OASST_20), "--out", str(three), "--held-out", "4", "--train-draws", "3"])
    first, drawn = read_jsonl(one / "train.jsonl"), read_jsonl(three / "train.jsonl")
    assert drawn[:len(first)] == first and len(drawn) == 3 * len(first)
    assert len({r["prompt"] for r in drawn}) == len(drawn)
    base = {r["id"] for r in first}
    assert {r["id"] for r in drawn} == base | {f"{i}:{d}" for i in base for d in (1, 2)}
    held = {r["id"].split(":")[0] for r in read_jsonl(three / "heldout.jsonl")}
    assert not held & base
    with pytest.raises(ConfigError, match="--train-draws 0"):
        V.main(["--oasst", str(OASST_20), "--out", str(tmp_path / "x"), "--train-draws", "0"])
