"""The shipped M0 (recipes/world/m0/): it is the M0 of today's world, and any change to the world's code or
settings that would give another M0 changes the key, so this test fails until M0 is rebuilt and shipped
(`python -m selfreward.recipes.world.build --out recipes/world/m0`, the command in its manifest)."""
import dataclasses
import json

import pytest

from selfreward.recipes.world import build, tasks
from selfreward.recipes.world.build import SHIPPED, WorldModelConfig, m0_folder
from selfreward.recipes.world.rows import paired, pass_at_n


def test_shipped_m0_is_the_worlds():
    man = json.loads((SHIPPED / "manifest.json").read_text())
    mc = WorldModelConfig()
    assert man["key"] == mc.key(), ("the world's code or settings changed since M0 was shipped: rebuild it with "
                                    f"{man['command']}")
    assert man["settings"] == dataclasses.asdict(mc)
    size = sum((SHIPPED / f).stat().st_size for f in man["files"])
    assert size < 8e6                                           # a few MB in the repository
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (mc.hidden, mc.layers, mc.vocab)


def test_key_follows_the_worlds_output(monkeypatch):
    mc = WorldModelConfig()
    k, k1 = mc.key(), mc.key(1)
    monkeypatch.setitem(tasks.SIZES, "max", 9)                  # the world's code: longer max lists
    assert mc.key() != k and mc.key(1) == k1                    # phase 1 reads BASE_SIZES, not SIZES
    monkeypatch.undo()
    assert mc.key() == k
    monkeypatch.setattr(build, "JUDGE_TEMPLATE", build.JUDGE_TEMPLATE + " ")
    assert mc.key() != k
    monkeypatch.undo()
    assert dataclasses.replace(mc, pretrain_steps=401).key() not in (k,)
    assert dataclasses.replace(mc, pretrain_steps=401).key(1) == k1   # phase 2's settings leave phase 1 alone
    assert dataclasses.replace(mc, base_steps=999).key(1) != k1


def test_demo_takes_the_shipped_m0_or_builds(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(build, "build_m0", lambda cache, mc, *a: built.append(mc) or tmp_path / "built")
    mc = WorldModelConfig()
    assert m0_folder(mc, tmp_path) == SHIPPED and not built
    assert m0_folder(mc, tmp_path, rebuild=True) == tmp_path / "built" and len(built) == 1
    assert m0_folder(dataclasses.replace(mc, pretrain_steps=1), tmp_path) == tmp_path / "built"
    assert not any(tmp_path.iterdir())


def test_pass_at_n_and_paired_se_by_hand():
    prompts = {"a": "Which is largest: 7, 81, 30?", "b": "Sort these digits: 3 1 2"}
    cands = [{"id": "a", "text": "81"}, {"id": "a", "text": "30"}, {"id": "b", "text": "3 1 2"},
             {"id": "b", "text": "1 3 2"}]
    r = pass_at_n(prompts, cands)
    assert r["loop_pass_at_n"] == 0.5 and r["loop_sample_acc"] == 0.25
    assert r["loop_pass_by_kind"] == {"max": 1.0, "sort": 0.0}
    res = {"A": {"greedy_correct": "1101"}, "B": {"greedy_correct": "0100"}}
    d = paired(res, "A", "B")             # differences 1, 0, 0, 1: mean 0.5, sample sd 0.57735, se 0.288675
    assert d["diff"] == 0.5 and d["se"] == pytest.approx(0.5773503 / 2) and d["n"] == 4
    assert paired(res, "A", "C") is None


def test_loop_kinds_are_a_subset_of_m0s():
    from selfreward import cli
    from selfreward.recipes.world.demo import DemoConfig, loop_kinds
    assert loop_kinds(DemoConfig(kinds="")) == WorldModelConfig().kind_tuple()
    assert loop_kinds(DemoConfig(kinds="min")) == ("min",)
    with pytest.raises(cli.ConfigError, match="count is not one of M0's kinds"):
        loop_kinds(DemoConfig(kinds="min,count"))
