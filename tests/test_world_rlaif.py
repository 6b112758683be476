"""World RLAIF (recipes/world/rlaif.py): the pairwise seed's labels agree with the checker, and the whole run
(`demo --method rlaif`) at tiny sizes writes the summary figures, a reward model transformers loads and the
RL rows of part 2 (recipes/world/rlaif_rl.py); the win rate's tie rule."""
from __future__ import annotations

import json

SMOKE = ["--m0-hidden", "32", "--m0-layers", "2", "--m0-heads", "2", "--m0-ffn", "64", "--m0-web-docs", "2000",
         "--m0-web-p-judge", "0.5", "--m0-base-steps", "0",
         "--m0-pretrain-steps", "60", "--m0-pretrain-batch", "16", "--m0-pretrain-lr",
         "1e-2", "--n-ift", "24", "--n-eft", "48", "--n-pref", "48", "--sft-steps", "10", "--sft-batch", "8",
         "--n-prompts", "40", "--n-candidates", "3", "--rm-epochs", "1", "--rm-batch", "4",
         "--cot-max-tokens", "48", "--n-control", "8", "--threads", "1", "--rl-steps", "2", "--rl-batch", "2",
         "--rl-num-samples", "2", "--rl-n-prompts", "8", "--rl-n-eval", "6", "--rl-probe-every", "1",
         "--rl-max-tokens", "8"]


def test_pref_seed_labels_follow_the_checker():
    from selfreward.recipes.world.checker import parse_prompt, is_correct
    from selfreward.recipes.world.rlaif import WORLD_TEMPLATE, pref_seed
    import re
    recs = pref_seed(200, 0)
    decided = cot = 0
    for r in recs:
        sys_, user, asst = (m["content"] for m in r["messages"])
        assert sys_ == WORLD_TEMPLATE.preamble
        m = re.match(r"Task: (.*) 1: (.*) 2: (.*?)( Check both\.)?$", user)
        task = parse_prompt(m.group(1))
        right = [is_correct(task, m.group(2)), is_correct(task, m.group(3))]
        assert not all(right) and asst.endswith(("Preferred: 1", "Preferred: 2"))
        if sum(right) == 1:
            decided += 1
            assert asst.endswith(f"Preferred: {1 if right[0] else 2}")
        if m.group(4):
            cot += 1
            assert asst.startswith("1: ") and " 2: " in asst and asst.count("Score:") == 2
            # the reasons are the reference judgments of answer 1, then answer 2 (the checked labels' layout)
            from selfreward.recipes.world.judging import judgment
            assert asst == f"1: {judgment(task, m.group(2))} 2: {judgment(task, m.group(3))} " + asst[-12:]
    assert decided > 100 and 60 < cot < 140


def test_world_rlaif_smoke(tmp_path, monkeypatch):
    import torch
    import transformers
    from selfreward.infer import config
    from selfreward.recipes.world import demo
    run = tmp_path / "run"
    seen, real = [], config.load_engine
    monkeypatch.setattr(config, "load_engine", lambda path, cfg=None: seen.append(cfg) or real(path, cfg))
    s = demo.main(["--method", "rlaif", "--run-dir", str(run), "--cache-dir", str(tmp_path / "cache"),
                   "--engine-device", "cpu", "--engine-max-num-seqs", "7"] + SMOKE)
    # the engine flags reach M1's sampler / labeller and every RL run's sampler (at most 128 sequences there)
    assert (seen[0].device, seen[0].max_num_seqs) == ("cpu", 7)
    for src in ("checker", "rm", "direct"):
        e = json.loads((run / "rl" / src / "run.json").read_text())["config"]["engine"]
        assert (e["device"], e["max_num_seqs"]) == ("cpu", 128)
    on_disk = json.loads((run / "summary.json").read_text())
    for k in ("label_agreement", "position_bias_one_order", "position_bias_both_orders", "rm_pairwise"):
        assert k in on_disk
    assert s["pairs"] > 0
    for name in ("direct", "cot", "checked"):
        lab = s["labels"][name]
        assert 0 <= lab["position_bias"]["one_order"] <= 1 and lab["prefill"]["prefix_hit"] > 0
        rows = [json.loads(x) for x in (run / f"labels_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == s["pairs"]
        for r in rows:   # each label is the mean of its two orders, read off the probabilities it stores
            want = (r["p_first"] + 1 - r["p_first_swapped"]) / 2
            assert abs(r["label"][0] - want) < 1e-6 and abs(r["label"][1] - (1 - want)) < 1e-6
    assert all("rationales" in json.loads(x) for x in (run / "labels_cot.jsonl").read_text().splitlines())
    # checked labels: each order's rationale holds the same two checks, numbered by that order
    for r in map(json.loads, (run / "labels_checked.jsonl").read_text().splitlines()):
        given, swapped = r["rationales"]
        cuts = [i for i in range(len(given)) if given.startswith(" 2: ", i)]
        assert given.startswith("1: ") and any(swapped == f"1: {given[i + 4:]} 2: {given[3:i]}".strip()
                                               for i in cuts)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "rm" / "model", dtype=torch.float32)
    assert hf.config.num_labels == 1
    # part 2: RL from M1 against each source, the SFT row first, probes at steps 0, 1, 2
    assert [r["model"] for r in on_disk["rows"]] == ["SFT (M1)", "RL-checker", "RL-rm", "RL-direct"]
    assert all(0 <= r["greedy_acc"] <= 1 and 0 <= r["win_rate_vs_sft"] <= 1 for r in on_disk["rows"])
    assert all(abs(r["gain_vs_sft"] - (r["greedy_acc"] - on_disk["rows"][0]["greedy_acc"])) < 1e-9
               for r in on_disk["rows"][1:])
    assert 0 < on_disk["sync_share"] < 1
    assert [p["step"] for p in on_disk["rl_curves"]["rm"]["greedy_acc"]] == [0, 1, 2]
    # M1, the pairs, the RM and the RL runs are reused on a rerun: one with another setting is refused at once
    import pytest
    from selfreward.records import DataError
    before = (run / "summary.json").read_bytes()
    with pytest.raises(DataError, match=r"rlaif_settings.json.*n_prompts: 40 -> 41"):
        demo.main(["--method", "rlaif", "--run-dir", str(run), "--cache-dir", str(tmp_path / "cache")] + SMOKE
                  + ["--n-prompts", "41"])
    assert (run / "summary.json").read_bytes() == before
    # the RL settings are checked per --rl-dir: another step count in the same one is refused, in another one runs
    with pytest.raises(DataError, match=r"rl_settings.json.*steps: 2 -> 3"):
        demo.main(["--method", "rlaif", "--run-dir", str(run), "--cache-dir", str(tmp_path / "cache")] + SMOKE
                  + ["--rl-steps", "3", "--rl-sources", "checker"])
    s3 = demo.main(["--method", "rlaif", "--run-dir", str(run), "--cache-dir", str(tmp_path / "cache")] + SMOKE
                   + ["--rl-steps", "3", "--rl-sources", "checker", "--rl-dir", "rl3"])
    assert [p["step"] for p in s3["rl_curves"]["checker"]["greedy_acc"]] == [0, 1, 2, 3]


def test_win_rate_counts_ties_half():
    from selfreward.recipes.world.rlaif_rl import win_rate
    # right-vs-wrong wins, wrong-vs-right loses, both right and both wrong are ties
    assert win_rate([True, True, False, False], [True, False, True, False]) == (0.5 + 1 + 0 + 0.5) / 4
    assert win_rate([True, True, True], [False, False, True]) == (1 + 1 + 0.5) / 3


def test_gain_over_sft_and_its_paired_standard_error_by_hand():
    from selfreward.recipes.metrics import paired_diff
    # differences 0, 1, -1, 0, 1: mean 0.2; sample variance (0.04 + 0.64 + 1.44 + 0.04 + 0.64) / 4 = 0.7
    m, se = paired_diff([True, True, False, False, True], [True, False, True, False, False])
    assert m == 0.2 and abs(se - (0.7 / 5) ** 0.5) < 1e-12


def test_bad_label_and_source_names_are_refused_before_anything_is_written(tmp_path):
    import pytest
    from selfreward.cli import ConfigError
    from selfreward.recipes.world import demo
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--rm-labels foo: choose from direct, cot, checked"):
        demo.main(["--method", "rlaif", "--run-dir", str(run), "--rm-labels", "foo"])
    with pytest.raises(ConfigError, match=r"--rl-sources 'checker,rm': choose from checker, rm, direct"):
        demo.main(["--method", "rlaif", "--run-dir", str(run), "--rl-sources", "checker,rm"])
    assert not run.exists()
