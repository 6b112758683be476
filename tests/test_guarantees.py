"""Issue 19, the ten cases that lost or silently misused data: each is now refused with `error: ...` (exit 2)
and leaves the earlier output as it was, or behaves safely. Every test runs the real entry point
(tests/cli_harness.py: its own `__main__`, in this process) or, for a second writer, a real second process."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from cli_harness import run_cli
from conftest import OASST_20
from guarantee_fixtures import build, one_thread, lines, sample_args, sft_args, start, wait_for


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("guarantees")
    with one_thread():
        yield dict(build(d), dir=d)


def ok(res):
    assert res[0] == 0, res[1][-3000:]
    return res[1]


def refused(res, *needles):
    code, err = res
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "error: " in err, err
    for n in needles:
        assert n in err, err
    return err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_case1_oasst_empty_input_over_a_seed_folder(w):
    seed = w["dir"] / "seed"
    ok(run_cli("oasst", ["--input", OASST_20, "--out", seed]))
    before = snapshot(seed)
    assert len(lines(seed / "ift.jsonl")) > 0
    empty = w["dir"] / "empty.jsonl"
    empty.write_text("")
    refused(run_cli("oasst", ["--input", empty, "--out", seed]), "empty.jsonl: no Open Assistant messages")
    assert snapshot(seed) == before
    # another input or other settings over the folder: refused too, until --overwrite
    refused(run_cli("oasst", ["--input", OASST_20, "--out", seed, "--eval-frac", "0.5"]), "eval_frac: 0.25 -> 0.5",
            "--overwrite")
    assert snapshot(seed) == before
    ok(run_cli("oasst", ["--input", OASST_20, "--out", seed]))          # the same command again: fine
    assert snapshot(seed) == before


def test_case2_sft_into_an_earlier_run_without_resume(w):
    out = w["dir"] / "sft_run"
    ok(run_cli("sft", sft_args(w, out)))
    before = snapshot(out)
    assert len(lines(out / "metrics.jsonl")) >= 6
    refused(run_cli("sft", sft_args(w, out, "--max-steps", "2")), "holds an earlier run", "--resume", "--overwrite")
    assert snapshot(out) == before                                         # metrics, model/, latest untouched
    ok(run_cli("sft", sft_args(w, out, "--max-steps", "2", "--overwrite")))  # start over: asked for
    assert [r["step"] for r in lines(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_case3_sample_rerun_with_another_model_or_temperature(w):
    out = w["dir"] / "s3.jsonl"
    ok(run_cli("sample", sample_args(w, out)))
    before = out.read_bytes()
    refused(run_cli("sample", sample_args(w, out) + ["--temperature", "0.5"]), "temperature: 1.0 -> 0.5")
    args_b = sample_args(w, out)
    args_b[1] = str(w["model_b"])
    refused(run_cli("sample", args_b), "model_fingerprint")
    other_input = w["dir"] / "p3.jsonl"
    other_input.write_text(w["prompts"].read_text().replace("cats", "dogs"))
    refused(run_cli("sample", sample_args(w, out)[:3] + [str(other_input)] + sample_args(w, out)[4:]), "input_hash")
    assert out.read_bytes() == before
    ok(run_cli("sample", args_b + ["--overwrite"]))                        # the new samples, really made anew
    fresh = w["dir"] / "s3_fresh.jsonl"
    ok(run_cli("sample", args_b[:5] + [str(fresh)] + args_b[6:]))
    assert lines(out) == lines(fresh) and out.read_bytes() != before


def test_case4_sample_n1_over_an_n2_output(w):
    out = w["dir"] / "s4.jsonl"
    ok(run_cli("sample", sample_args(w, out)))
    assert len(lines(out)) == 12
    refused(run_cli("sample", sample_args(w, out) + ["--n", "1"]), "n: 2 -> 1")
    assert len(lines(out)) == 12


def test_case5_self_reward_rerun_with_other_settings(w):
    from selfreward import cli
    from selfreward.recipes.pipeline import check_run
    from selfreward.recipes.self_reward import LOOP_SET, LoopConfig
    run = w["dir"] / "loop"
    base = ["--run-dir", run, "--init-model", w["model"], "--seed-prompts", w["prompts"], "--n-prompts", "4",
            "--candidates-n", "2", "--candidates-max-tokens", "8", "--judge-k", "1", "--judge-max-tokens", "8"]
    made = cli.build(LoopConfig, cli.parser(LoopConfig, skip=LOOP_SET).parse_args([str(a) for a in base]))
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cli.to_dict(made)))       # what a run with n 2 leaves
    (run / "iter_1").mkdir()
    (run / "iter_1" / "candidates.jsonl").write_text('{"id": 0, "sample": 0}\n')
    refused(run_cli("self_reward", base + ["--candidates-n", "3", "--candidates-temperature", "0.3"]),
            "candidates.n: 2 -> 3", "candidates.temperature: 0.7 -> 0.3", "--overwrite")
    assert not (run / "iter_1" / "manifest.json").exists()                # nothing recorded as made with n 3
    check_run(dataclass_replace(made, iterations=5, nproc=1), cli.to_dict(made))   # more iterations: ok


def test_case5_humpback_rerun_with_other_settings(w):
    from selfreward import cli
    from selfreward.recipes.humpback import SET_HERE, HumpbackConfig
    run = w["dir"] / "hb"
    base = ["--run-dir", run, "--base-model", w["model"], "--seed-data", w["sft"], "--unlabelled", w["prompts"]]
    made = cli.build(HumpbackConfig, cli.parser(HumpbackConfig, skip=SET_HERE).parse_args([str(a) for a in base]))
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cli.to_dict(made)))
    refused(run_cli("humpback", base + ["--seed", "5"]), "seed: 0 -> 5", "--overwrite")


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_case6_dpo_beta_refused_before_any_work(w):
    for extra, msg in ((["--beta", "-1"], "--beta -1: must be >= 0"), (["--beta", "-2"], "--beta -2"),
                       (["--loss", "ipo", "--beta", "0"], "--beta 0: must be > 0")):
        out = w["dir"] / f"dpo6_{len(msg)}"
        refused(run_cli("dpo", ["--model", w["model"], "--data", w["pairs"], "--output", out] + extra), msg)
        assert not out.exists()


def test_case7_sft_with_every_example_dropped(w):
    from test_train_fixtures import sft_records, write_jsonl
    chat = write_jsonl(w["dir"] / "chat7.jsonl", [r for r in sft_records(24, seed=1) if "text" not in r])
    out = w["dir"] / "sft7"
    args = sft_args(w, out, "--max-length", "4")
    args[args.index("--data") + 1] = str(chat)       # every prompt is longer than 4 tokens: no target left
    refused(run_cli("sft", args), "no examples left to train on")
    assert not (out / "model").exists()


def test_case8_never_writes_over_its_input(w):
    inp = w["dir"] / "p8.jsonl"
    inp.write_bytes(w["prompts"].read_bytes())
    refused(run_cli("sample", sample_args(w, inp, "prompts")[:3] + [str(inp), "--output", str(inp)]),
            "refusing to write over the input")
    assert inp.read_bytes() == w["prompts"].read_bytes()
    seed = w["dir"] / "seed8"
    ok(run_cli("oasst", ["--input", OASST_20, "--out", seed]))
    before = snapshot(seed)
    refused(run_cli("oasst", ["--input", seed / "ift.jsonl", "--out", seed]), "refusing to write over an input")
    assert snapshot(seed) == before
    refused(run_cli("sft", sft_args(w, w["dir"] / "sft8", "--export", w["model"])), "refusing to write over an input")


def test_case9_two_samplers_into_one_output(w):
    out = w["dir"] / "s9.jsonl"
    a = start("sample", sample_args(w, out, "many_prompts", "--max-num-seqs", "1", "--max-tokens", "16"))
    try:
        assert wait_for(lambda: out.with_name("s9.jsonl.lock").exists(), a), a.communicate()[1]
        refused(run_cli("sample", sample_args(w, out, "many_prompts", "--max-num-seqs", "1", "--max-tokens", "16")),
                f"another run (pid {a.pid})")
        assert a.wait(timeout=120) == 0, a.communicate()[1]
    finally:
        a.kill()
    recs = lines(out)
    assert sorted((r["id"], r["sample"]) for r in recs) == [(i, j) for i in range(24) for j in range(2)]
    # the refused run leaves the holder's files alone: an empty .partial the holder has just opened (the holder
    # has not flushed its first prompt yet) stays (a refused run once deleted it, and the holder's finish failed)
    from selfreward.provenance import output_lock
    out3 = w["dir"] / "s9c.jsonl"
    with output_lock(out3):
        out3.with_name("s9c.jsonl.partial").write_bytes(b"")
        refused(run_cli("sample", sample_args(w, out3)), "another run")
        assert out3.with_name("s9c.jsonl.partial").exists()
    # a holder that died without releasing: its lock file is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out2 = w["dir"] / "s9b.jsonl"
    out2.with_name("s9b.jsonl.lock").write_text(f"{dead.pid}\n")
    ok(run_cli("sample", sample_args(w, out2)))
    assert not out2.with_name("s9b.jsonl.lock").exists()


def test_case10_two_trainers_into_one_output(w):
    out = w["dir"] / "sft10"
    a = start("sft", sft_args(w, out, "--sleep-per-step", "0.3", "--max-steps", "40"))
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").exists() and len(lines(out / "metrics.jsonl")) >= 2, a), \
            a.communicate()[1]
        refused(run_cli("sft", sft_args(w, out, "--resume")), f"another run (pid {a.pid})")
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    steps = [r["step"] for r in lines(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))                         # one writer: no interleaving
