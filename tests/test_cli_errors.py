"""Issue 19, one error style: every entry point (the trainers, the sampler, every recipe CLI, the world demo)
answers each user error below with `error: ...` naming the flag or the file, exit 2, and no traceback; flags
are checked before any work (nothing written); model-load errors name the file."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cli_harness import run_cli
from conftest import OASST_20
from guarantee_fixtures import build, one_thread, sft_args


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    with one_thread():
        yield _world(d)


def _world(d):
    w = dict(build(d), dir=d)
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(b'{"id": 1, "prompt": "caf\xe9"}\n')
    (d / "a_file").write_text("not a folder")
    (d / "long_rubric.txt").write_text("Judge this. " * 400 + "{instruction} {response} Score: ")
    (d / "lpairs.jsonl").write_text('{"prompt": "a", "response_1": "b", "response_2": "c"}\n')
    m = w["model"]
    for name, damage in (("trunc", "truncate"), ("shape", "shape"), ("cfg8", "config_bytes"), ("shard", "shard"),
                         ("mpe", "max_position")):
        bad = d / f"bad_{name}"
        if damage == "shard":
            from selfreward.model.checkpoint import load_model, save_model
            save_model(load_model(m), load_model(m).cfg, bad, tokenizer_dir=m, max_shard_bytes=20_000)
            shard = sorted(bad.glob("model-*.safetensors"))[1]
            shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
            continue
        shutil.copytree(m, bad)
        if damage == "truncate":
            f = bad / "model.safetensors"
            f.write_bytes(f.read_bytes()[:5000])
        elif damage in ("shape", "max_position"):
            cfg = json.loads((bad / "config.json").read_text())
            cfg.update({"intermediate_size": 96} if damage == "shape" else {"max_position_embeddings": -5})
            (bad / "config.json").write_text(json.dumps(cfg))
        else:
            (bad / "config.json").write_bytes((bad / "config.json").read_bytes().replace(b'"llama"', b'"ll\xffma"'))
    return w


def S(*extra, model="model", inp="prompts", out="out.jsonl"):
    return lambda w: ["--model", w[model] if model in w else w["dir"] / model, "--input",
                      w[inp] if inp in w else w["dir"] / inp, "--output", w["dir"] / out, "--max-tokens", "4", *extra]


def T(*extra, data="sft"):
    def argv(w):
        a = sft_args(w, w["dir"] / "run_err", *[w["dir"] / x if x.startswith("a_file") else x for x in extra])
        a[a.index("--data") + 1] = str(w[data] if data in w else w["dir"] / data)
        return a
    return argv


def D(*extra):
    return lambda w: ["--model", w["model"], "--data", w["pairs"], "--output", w["dir"] / "dpo_err", "--max-steps",
                      "1", "--batch-size", "2", "--max-length", "40", *extra]


def LOOP(*extra, seeds="prompts"):
    return lambda w: ["--run-dir", w["dir"] / "loop_err", "--init-model", w["model"], "--seed-prompts",
                      w[seeds] if seeds in w else w["dir"] / seeds, "--n-prompts", "2", *extra]


CASES = [
    # infer/sample.py: flags named, checked before the model is loaded or a file written
    ("sample", S("--top-p", "1.5"), "--top-p 1.5: must lie in (0, 1]"),
    ("sample", S("--n", "0"), "--n 0: must be >= 1"),
    ("sample", S("--block-size", "0"), "--block-size 0: must be >= 1"),
    ("sample", S("--max-num-seqs", "0"), "--max-num-seqs 0: must be >= 1"),
    ("sample", S("--stop", ""), "--stop ''"),
    ("sample", S("--temperature", "-1"), "--temperature -1: must be >= 0"),
    ("sample", S(inp="empty.jsonl"), "empty.jsonl: no prompts"),
    ("sample", S(inp="latin1.jsonl"), "latin1.jsonl:1: not UTF-8"),
    ("sample", S(inp="missing.jsonl"), "missing.jsonl: no such file"),
    ("sample", S(model="missing_model"), "--model"),
    ("sample", S(model="bad_trunc"), "bad_trunc/model.safetensors: not a readable safetensors file"),
    ("sample", S(model="bad_shard"), "model-00002-of-"),
    ("sample", S(model="bad_shape"), "has shape"),
    ("sample", S(model="bad_cfg8"), "bad_cfg8/config.json: not UTF-8"),
    ("sample", S(out="a_file/out.jsonl"), "a_file"),
    # train/sft.py, train/dpo.py, train/rm.py
    ("sft", T("--batch-size", "0"), "--batch-size 0: must be >= 1"),
    ("sft", T("--resume", "--overwrite"), "--resume and --overwrite: choose one"),
    ("sft", T(data="latin1.jsonl"), "latin1.jsonl:1: not UTF-8"),
    ("sft", T(data="missing.jsonl"), "missing.jsonl"),
    ("sft", T(data="empty.jsonl"), "empty.jsonl: no records"),
    ("sft", T(data="prompts"), "prompts.jsonl:1"),
    ("sft", T("--export", "a_file/model"), "--export"),
    ("sft", lambda w: sft_args(w, w["dir"] / "run_err2")[:1] + [w["dir"] / "bad_trunc"] + sft_args(w, w["dir"] / "x")[2:],
     "model.safetensors: not a readable safetensors file"),
    ("dpo", D("--beta", "-1"), "--beta -1: must be >= 0"),
    ("dpo", D("--loss", "ipo", "--beta", "0"), "--beta 0: must be > 0"),
    ("dpo", D("--loss", "kto"), "--loss 'kto'"),
    ("dpo", D("--max-prompt-length", "50"), "--max-prompt-length 50"),
    ("dpo", lambda w: D()(w)[:3] + [w["sft"]] + D()(w)[4:], "sft.jsonl:1"),
    ("rm", lambda w: ["--model", w["model"], "--data", w["dir"] / "empty.jsonl", "--output", w["dir"] / "rm_err",
                      "--max-steps", "1", "--batch-size", "2", "--max-length", "40"], "empty.jsonl: no records"),
    # recipes
    ("oasst", lambda w: ["--input", w["dir"] / "empty.jsonl", "--out", w["dir"] / "seed_err"], "no Open Assistant"),
    ("oasst", lambda w: ["--input", OASST_20, "--out", w["dir"] / "seed_err", "--lang", "EN"],
     "--lang EN: no message matched (languages in the file: en"),
    ("oasst", lambda w: ["--input", OASST_20, "--out", w["dir"] / "seed_err", "--eval-frac", "2"], "--eval-frac 2"),
    ("oasst", lambda w: ["--input", w["dir"] / "latin1.jsonl", "--out", w["dir"] / "seed_err"], "not UTF-8"),
    ("self_reward", LOOP(seeds="empty.jsonl"), "no seed prompts"),
    ("self_reward", LOOP(seeds="missing.jsonl"), "missing.jsonl"),
    ("self_reward", LOOP("--candidates-n", "1"), "--candidates-n is below its minimum"),
    ("self_reward", LOOP("--judge-k", "0"), "--judge-k 0: must be >= 1"),
    ("self_reward", LOOP("--engine-block-size", "0"), "--engine-block-size 0: must be >= 1"),
    ("self_reward", LOOP("--engine-max-num-seqs", "0"), "--engine-max-num-seqs 0: must be >= 1"),
    ("self_reward", LOOP("--judge-template", "long_rubric.txt"), "the rubric alone takes"),
    ("evaluate", lambda w: ["rm", "--judge", w["model"], "--groups", w["dir"] / "empty.jsonl", "--out",
                            w["dir"] / "rm.json"], "no groups"),
    ("evaluate", lambda w: ["rm", "--judge", w["model"], "--groups", w["dir"] / "empty.jsonl", "--out",
                            w["dir"] / "rm.json", "--k", "0"], "--k 0: must be >= 1"),
    ("evaluate", lambda w: ["h2h", "--a", w["model"], "--b", w["model"], "--judge", w["model"], "--prompts",
                            w["dir"] / "empty.jsonl", "--out", w["dir"] / "h.json"], "no prompts"),
    ("evaluate", lambda w: ["reward", "--model", w["dir"] / "bad_trunc", "--groups", w["dir"] / "empty.jsonl",
                            "--out", w["dir"] / "r.json"], "no groups"),
    ("rlaif", lambda w: ["label", "--labeller", w["model"], "--pairs", w["dir"] / "empty.jsonl", "--out",
                         w["dir"] / "l.jsonl"], "no pairs"),
    ("rlaif", lambda w: ["label", "--labeller", w["model"], "--groups", w["dir"] / "empty.jsonl", "--out",
                         w["dir"] / "l.jsonl", "--chunk", "0"], "--chunk 0: must be >= 1"),
    ("rlaif", lambda w: ["label", "--labeller", w["model"], "--groups", w["dir"] / "empty.jsonl", "--out",
                         w["dir"] / "l.jsonl", "--engine-dtype", "float64"], "engine dtype 'float64'"),
    # the tests' tiny tokenizer writes "1" and "2" alike after the ending: refused before any output file
    ("rlaif", lambda w: ["label", "--labeller", w["model"], "--pairs", w["dir"] / "lpairs.jsonl", "--out",
                         w["dir"] / "l.jsonl"], "no token of its own after 'Preferred response:'"),
    ("evaluate", lambda w: ["reward", "--model", w["model"], "--groups", w["dir"] / "empty.jsonl",
                            "--out", w["dir"] / "r.json", "--engine-block-size", "0"],
     "--engine-block-size 0: must be >= 1"),
    ("humpback", lambda w: ["--run-dir", w["dir"] / "hb_err", "--base-model", w["model"], "--seed-data",
                            w["dir"] / "missing.jsonl", "--unlabelled", w["prompts"]], "missing.jsonl"),
    ("humpback", lambda w: ["--run-dir", w["dir"] / "hb_err", "--train-k", "9"], "--train-k 9"),
    ("self_reward", lambda w: LOOP("--sft-data", w["prompts"])(w), "M1 is --init-model, or SFT of --base-model"),
    # issue 33: the reward model's loader names the tensor, as every other loader (was a load_state_dict trace)
    ("rm", lambda w: ["--model", w["dir"] / "bad_shape", "--data", w["pairs"], "--output", w["dir"] / "rm_shape",
                      "--max-steps", "1", "--batch-size", "2", "--max-length", "40"],
     "model.layers.0.mlp.gate_proj.weight' has shape"),
]

# issue 33: every numeric flag is checked at the door by one rule (ranges.check_number: finite, in range, named),
# before any model loads; these were accepted (NaN, inf, a negative KL) or failed deep in the engine
R = lambda *extra: lambda w: ["--model", w["model"], "--data", w["prompts"], "--output", w["dir"] / "rl_err",  # noqa
                              "--reward", "checker", *extra]
SEL = lambda *extra: lambda w: ["--candidates", w["model_b"], "--reference", w["model"], "--prompts",  # noqa
                                w["prompts"], *extra]
HB = lambda *extra: lambda w: ["--run-dir", w["dir"] / "hb_err", "--base-model", w["model"], "--seed-data",  # noqa
                               w["sft"], "--unlabelled", w["prompts"], *extra]
WD = lambda *extra: lambda w: ["--smoke", "--run-dir", w["dir"] / "wd_err", "--cache-dir", w["dir"] / "wd_cache",  # noqa
                               *extra]
DOOR = [
    ("sample", S("--temperature", "nan"), "--temperature nan: must be a finite number"),          # case 8
    ("sample", S("--temperature", "inf"), "--temperature inf: must be a finite number"),
    ("sample", S("--top-p", "nan"), "--top-p nan: must be a finite number"),
    ("evaluate", lambda w: ["h2h", "--a", w["model"], "--b", w["model"], "--judge", w["model"], "--prompts",  # case 9
                            w["prompts"], "--out", w["dir"] / "h_nan.json", "--temperature", "nan"],
     "--temperature nan: must be a finite number"),
    ("rl", R("--reward", "bogus"), "--reward 'bogus': choose one of rm, direct, judge, checker"),
    ("rl", R("--reward", "rm"), "--reward rm needs --reward-model"),
    ("rl", R("--top-p", "1.5"), "--top-p 1.5: must lie in (0, 1]"),
    ("rl", R("--max-new-tokens", "0"), "--max-new-tokens 0: must be >= 1"),
    ("rl", R("--num-samples", "0"), "--num-samples 0: must be >= 1"),
    ("select", SEL("--temperature", "-1"), "--temperature -1: must be >= 0"),
    ("select", SEL("--top-p", "1.5"), "--top-p 1.5: must lie in (0, 1]"),
    ("self_reward", LOOP("--candidates-top-p", "1.5"), "--candidates-top-p 1.5: must lie in (0, 1]"),
    ("self_reward", LOOP("--candidates-temperature", "-1"), "--candidates-temperature -1: must be >= 0"),
    ("self_reward", LOOP("--min-margin", "nan"), "--min-margin nan: must be a finite number"),
    ("self_reward", LOOP("--n-prompts", "0"), "--n-prompts 0: must be >= 1 (0 = a whole --prompt-source file)"),
    ("humpback", HB("--augment-top-p", "1.5"), "--augment-top-p 1.5: must lie in (0, 1]"),
    ("humpback", HB("--segment-near-dup", "2"), "--segment-near-dup 2: must lie in [0, 1]"),
    ("world_demo", WD("--top-p", "1.5"), "--top-p 1.5: must lie in (0, 1]"),
    ("world_demo", WD("--kinds", "bogus"), "--kinds bogus: unknown task kinds ['bogus']"),
    ("world_demo", WD("--threads", "-1"), "--threads -1: must be >= 0"),
    ("world_demo", WD("--sft-lr", "inf"), "--sft-lr inf: must be a finite number"),
    ("dpo", D("--beta", "nan"), "--beta nan: must be a finite number"),
    ("sft", T("--eval-fraction", "2"), "--eval-fraction 2: must lie in [0, 1)"),
    ("sample", S(inp="a_dir"), "a_dir: a folder, not a file"),
    ("sample", S(model="bad_mpe"), "config.json: field 'max_position_embeddings': -5 must be an integer >= 2"),
]


@pytest.mark.parametrize("name,argv,needle", DOOR, ids=[f"{c[0]}-{i}" for i, c in enumerate(DOOR)])
def test_numbers_and_names_checked_at_the_door(w, name, argv, needle):
    """One line, exit 2, no traceback, and nothing written: no run folder, output or M0 cache appeared."""
    (w["dir"] / "a_dir").mkdir(exist_ok=True)
    before = set(w["dir"].iterdir())
    code, err = run_cli(name, argv(w))
    assert "Traceback" not in err and code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err, err[-3000:]
    assert set(w["dir"].iterdir()) == before, set(w["dir"].iterdir()) - before


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line_exit_2(w, name, argv, needle):
    a = argv(w)
    if name == "self_reward" and "long_rubric.txt" in a:
        a[a.index("long_rubric.txt")] = str(w["dir"] / "long_rubric.txt")
    code, err = run_cli(name, a)
    assert "Traceback" not in err and code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err, err[-3000:]


def test_a_second_loop_driver_is_locked_out(w):
    from selfreward.provenance import output_lock
    run = w["dir"] / "loop_locked"
    with output_lock(run, folder=True):
        code, err = run_cli("self_reward", LOOP()(w)[:1] + [run] + LOOP()(w)[2:])
    assert code == 2 and f"another run (pid {os.getpid()})" in err, err


def test_flag_errors_come_before_any_output(w):
    for argv in (S("--top-p", "1.5", out="early.jsonl"), S("--n", "0", out="early.jsonl")):
        assert run_cli("sample", argv(w))[0] == 2
    assert not list(w["dir"].glob("early.jsonl*"))
    assert run_cli("rlaif", ["label", "--labeller", w["model"], "--pairs", w["dir"] / "lpairs.jsonl", "--out",
                             w["dir"] / "early_l.jsonl"])[0] == 2       # options the tokenizer cannot tell apart
    assert not list(w["dir"].glob("early_l.jsonl*"))
    code, _ = run_cli("sft", T("--export", "a_file/model")(w))
    assert code == 2 and not (w["dir"] / "run_err" / "metrics.jsonl").exists()   # before the first step
    code, _ = run_cli("sample", S(model="bad_trunc", out="bad_model.jsonl")(w))
    assert code == 2 and not list(w["dir"].glob("bad_model.jsonl.partial"))      # no empty part file left


def test_error_lines_cut_long_values(capsys):
    """Issue 33: an error that would echo a huge field is cut to its two ends and the size of the middle."""
    from selfreward.cli import error_line, run_main
    assert error_line("x.jsonl:3: field 'id': missing") == "error: x.jsonl:3: field 'id': missing"
    msg = "A" * 300 + "B" * 1000 + "C" * 150                  # 1000 bytes between the kept ends
    assert error_line(msg) == "error: " + "A" * 300 + " ... (1.0 kB cut) ... " + "C" * 150

    def huge():
        from selfreward.records import DataError
        raise DataError("d.jsonl:1: field 'label' should be [p1, p2], got '" + "é" * 3_000_000 + "'")
    with pytest.raises(SystemExit) as e:
        run_main(huge)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 600, err[:600]
    assert err.startswith("error: d.jsonl:1: field 'label' should be") and "(6.0 MB cut)" in err   # é: 2 bytes


def test_ctrl_c_is_one_line_exit_130(capsys):
    """Ctrl-C: one `interrupted: ...` line (what was kept, how to continue), exit 130, no traceback; the
    trainers' wrapper says --resume (the subprocess runs are in tests/test_faults.py)."""
    from selfreward.cli import run_main
    from selfreward.train.loop import cli

    def stopped():
        raise KeyboardInterrupt
    for entry, how in ((run_main, "rerun the same command to continue"), (cli, "rerun with --resume to continue")):
        with pytest.raises(SystemExit) as e:
            entry(stopped)
        err = capsys.readouterr().err
        assert e.value.code == 130 and err.count("\n") == 1 and err.startswith("interrupted: "), err
        assert err.rstrip().endswith(how) and "Traceback" not in err
