"""A run killed with SIGKILL mid-way and resumed ends with the weights of an uninterrupted run; a NaN loss
stops the run with a message and keeps the last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_fixtures import make_model, make_spm, sft_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model = make_model(d / "m0", make_spm(d / "spm"))
    data = write_jsonl(d / "sft.jsonl", sft_records(40, seed=1))
    return d, model, data


def test_sigkill_then_resume_equals_uninterrupted(setup):
    from selfreward.model.checkpoint import load_model
    from selfreward.train import sft
    d, model, data = setup
    # dropout on: the resumed run must also restore the RNG stream, not only weights and optimizer
    args = ["--model", str(model), "--data", str(data), "--max-steps", "12", "--batch-size", "4", "--lr", "1e-3",
            "--final-lr", "1e-4", "--max-length", "40", "--dropout", "0.1", "--save-every", "3", "--warmup-steps", "2",
            "--eval-fraction", "0.1"]
    run = d / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "train" / "sft.py"), *args, "--output", str(run),
                          "--sleep-per-step", "0.4"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    latest = run / "checkpoints" / "latest"
    try:
        deadline = time.time() + 120
        while not (latest.exists() and latest.read_text().strip() >= "step_00000006"):
            assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)                        # somewhere in step 7 or 8
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL and not (run / "model").exists()
    (run / "checkpoints" / ".tmp-step_00000009").mkdir()   # as if killed while writing the next one
    (run / "checkpoints" / ".tmp-step_00000009" / "junk").write_text("half a checkpoint")

    sft.main(args + ["--output", str(run), "--resume"])
    sft.main(args + ["--output", str(d / "straight")])
    a, b = load_model(run / "model").state_dict(), load_model(d / "straight" / "model").state_dict()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(x)]
    assert train_steps == list(range(1, 13)) and steps[0] == 0   # no step logged twice after the resume
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_nan_loss_stops_with_message_and_keeps_checkpoint(setup):
    from selfreward.train import sft
    from selfreward.train.checkpointing import TrainingStopped
    d, model, data = setup
    out = d / "nan"
    with pytest.raises(TrainingStopped, match=r"weights exploded after step 1 .*last good checkpoint: none"):
        # an absurd lr blows the weights up in step 1: they are not saved as a checkpoint (issue 19: a resume
        # from them would NaN again at once)
        sft.main(["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "5",
                  "--batch-size", "4", "--lr", "1e35", "--final-lr", "1e35", "--max-length", "40",
                  "--save-every", "1", "--grad-clip", "0"])
    assert not (out / "checkpoints" / "latest").exists() and not list((out / "checkpoints").glob("step_*"))
    assert not (out / "model").exists()


def test_dpo_reference_cache_is_reused_and_matches_online(setup, capsys):
    from test_train_fixtures import dpo_records
    from selfreward.train import dpo
    d, model, _ = setup
    data = write_jsonl(d / "pairs.jsonl", dpo_records(8, seed=2))
    args = ["--model", str(model), "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3",
            "--max-length", "40", "--dropout", "0"]
    a = dpo.main(args + ["--output", str(d / "dpo_a")])
    files = list((d / "dpo_a" / "ref_cache").iterdir())
    assert len(files) == 1 and "cached in" in capsys.readouterr().out
    stamp = files[0].stat().st_mtime_ns
    b = dpo.main(args + ["--output", str(d / "dpo_b"), "--ref-cache-dir", str(d / "dpo_a" / "ref_cache")])
    assert "from cache" in capsys.readouterr().out and files[0].stat().st_mtime_ns == stamp
    c = dpo.main(args + ["--output", str(d / "dpo_c"), "--ref-mode", "online"])
    assert not (d / "dpo_c" / "ref_cache").exists()
    for k in ("loss", "margin", "reward_chosen", "logp_rejected"):
        assert a[k] == b[k] and abs(a[k] - c[k]) <= 1e-6 * max(1.0, abs(a[k])), k


def test_fewer_examples_than_a_batch_still_trains(setup, capsys):
    from safetensors.torch import load_file

    from test_train_fixtures import dpo_records
    from selfreward.train import dpo
    d, model, _ = setup
    data = write_jsonl(d / "few.jsonl", dpo_records(3, seed=4))
    dpo.main(["--model", str(model), "--data", str(data), "--batch-size", "16", "--epochs", "2", "--lr", "1e-3",
              "--max-length", "40", "--dropout", "0", "--output", str(d / "few"), "--export", str(d / "few_m")])
    out = capsys.readouterr().out
    assert "only 3 examples: batch size lowered from 16 to 3" in out and "2 steps of 3" in out
    before, after = load_file(str(model / "model.safetensors")), load_file(str(d / "few_m" / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)


def test_fewer_examples_than_a_batch_with_max_steps(setup, capsys):
    """Issue 13 item 3: with --max-steps too, 8 pairs and --batch-size 16 train (batch 8, said) rather than
    crash in global_batch."""
    from safetensors.torch import load_file

    from test_train_fixtures import dpo_records
    from selfreward.train import dpo
    d, model, _ = setup
    data = write_jsonl(d / "eight.jsonl", dpo_records(8, seed=5))
    last = dpo.main(["--model", str(model), "--data", str(data), "--batch-size", "16", "--micro-batch-size", "3",
                     "--max-steps", "2", "--lr", "1e-3", "--max-length", "40", "--dropout", "0",
                     "--output", str(d / "eight"), "--export", str(d / "eight_m")])
    out = capsys.readouterr().out
    assert "only 8 examples: batch size lowered from 16 to 8" in out and "2 steps of 8" in out
    assert last["step"] == 2
    before, after = load_file(str(model / "model.safetensors")), load_file(str(d / "eight_m" / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)
