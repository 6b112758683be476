"""Issue 19, the trainers' run folder and the files every command writes: --resume with other settings or data
is refused; `latest` naming a missing step falls back to the newest complete one; a NaN stop keeps only a
checkpoint that is good (a resume from it ends where an uninterrupted run does); --max-length above the
model's context is lowered with a message; written files and folders get the user's umask."""
from __future__ import annotations

import os
import stat

import pytest

from cli_harness import run_cli
from conftest import OASST_20
from guarantee_fixtures import build, lines, one_thread, sample_args, sft_args, weights


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_rules")
    with one_thread():
        w = dict(build(d), dir=d)
        code, err = run_cli("sft", sft_args(w, d / "ref"))
        assert code == 0, err
        yield w


def test_resume_with_other_settings_or_data_is_refused(w):
    out = w["dir"] / "resume"
    assert run_cli("sft", sft_args(w, out, "--max-steps", "2"))[0] == 0
    code, err = run_cli("sft", sft_args(w, out, "--max-steps", "2", "--resume", "--lr", "2e-3"))
    assert code == 2 and "lr: 0.001 -> 0.002" in err and "--overwrite" in err, err
    changed = w["dir"] / "sft_changed.jsonl"
    changed.write_text(w["sft"].read_text().replace("cat", "dog"))
    args = sft_args(w, out, "--max-steps", "2", "--resume")
    args[args.index("--data") + 1] = str(changed)
    code, err = run_cli("sft", args)
    assert code == 2 and "data_hashes" in err, err
    # what does not shape training may change on resume
    assert run_cli("sft", sft_args(w, out, "--max-steps", "2", "--resume", "--save-every", "1"))[0] == 0


def test_latest_naming_a_missing_step_falls_back(w):
    import shutil
    out = w["dir"] / "latest"
    assert run_cli("sft", sft_args(w, out, "--max-steps", "4"))[0] == 0
    code, err = run_cli("sft", sft_args(w, out, "--max-steps", "6", "--resume"))
    assert code == 2 and "max_steps: 4 -> 6" in err                       # a longer schedule is not a resume
    (out / "checkpoints" / "latest").write_text("step_00000009\n")        # the step it names is gone
    shutil.rmtree(out / "model")
    code, err, text = run_cli("sft", sft_args(w, out, "--max-steps", "4", "--resume"), stdout=True)
    assert code == 0, err
    assert "points to step_00000009, which is incomplete or missing; using step_00000004" in text
    assert "resumed from" in text and (out / "model" / "model.safetensors").exists()


def test_nan_stop_keeps_a_good_checkpoint(w, monkeypatch, capsys):
    from selfreward.cli import run_main
    from selfreward.train import sft
    real, calls = sft.SFTTask.micro, []

    def poisoned(self, model, idx):                       # step 4's loss is NaN (one micro-batch per step)
        loss, st = real(self, model, idx)
        calls.append(1)
        return (loss * float("nan"), st) if len(calls) == 4 else (loss, st)
    out = w["dir"] / "nan"
    monkeypatch.setattr(sft.SFTTask, "micro", poisoned)
    with pytest.raises(SystemExit) as stop:             # sft.py's main through run_main, in this process
        run_main(sft.main, [str(a) for a in sft_args(w, out, "--save-every", "1")])
    monkeypatch.setattr(sft.SFTTask, "micro", real)
    code, err = stop.value.code, capsys.readouterr().err
    assert code == 1 and "grad norm nan at step 4" in err and "Traceback" not in err, err
    # step_3's weights are what gave the NaN: not kept; step_2 is, and `latest` names it
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert run_cli("sft", sft_args(w, out, "--save-every", "1", "--resume"))[0] == 0
    a, b = weights(out / "model"), weights(w["dir"] / "ref" / "model")
    assert all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in b)


def test_max_length_above_the_context_is_lowered(w):
    out = w["dir"] / "long"
    code, err, text = run_cli("sft", sft_args(w, out, "--max-steps", "1", "--max-length", "4096"), stdout=True)
    assert code == 0, err          # make_hf_checkpoint's models have max_position_embeddings 256
    assert "--max-length 4096 is above the model's context (256 tokens" in text and "lowered to 256" in text
    assert "truncated to 256 tokens" in text
    from guarantee_fixtures import dpo_args
    args = dpo_args(w, w["dir"] / "long_dpo", "--max-steps", "1", "--max-length", "4096", "--max-prompt-length", "1024")
    code, err, text = run_cli("dpo", args, stdout=True)
    assert code == 0 and "--max-prompt-length 1024: lowered to 128" in text, err


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_and_folders_follow_the_umask(w, mask):
    old = os.umask(mask)
    try:
        out = w["dir"] / f"umask_{mask:o}"
        assert run_cli("sample", sample_args(w, out.with_suffix(".jsonl")))[0] == 0
        assert run_cli("sft", sft_args(w, out, "--max-steps", "2"))[0] == 0
        assert run_cli("oasst", ["--input", OASST_20, "--out", out / "seed"])[0] == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)   # noqa: E731
    for f in (out.with_suffix(".jsonl"), out / "model" / "model.safetensors", out / "model" / "config.json",
              out / "seed" / "ift.jsonl", out / "run.json", out / "checkpoints" / "latest"):
        assert mode(f) == 0o666 & ~mask, (f, oct(mode(f)))
    for folder in (out / "model", out / "checkpoints" / "step_00000002"):
        assert mode(folder) == 0o777 & ~mask, (folder, oct(mode(folder)))
    assert lines(out.with_suffix(".jsonl"))
