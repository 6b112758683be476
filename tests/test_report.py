"""Issue 32, item 4: --report-to sends what a trainer writes to metrics.jsonl to TensorBoard (read back with
tensorboard's own reader), W&B and MLflow (fakes that record their calls: neither is installed here); a missing
package is refused before any work; the loops pass it to each training stage; on a terminal the trainer shows one
updating line, and the held-out loss reaches the terminal."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import types

import pytest

from cli_harness import run_cli
from guarantee_fixtures import lines, one_thread
from test_train_fixtures import make_model, make_spm, sft_records, write_jsonl


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_wandb(calls: list) -> types.ModuleType:
    m = types.ModuleType("wandb")

    def init(**kw):
        calls.append(("init", kw))
        return types.SimpleNamespace(log=lambda d, step: calls.append(("log", step, d)),
                                     finish=lambda: calls.append(("finish",)))
    m.init = init
    return m


def fake_mlflow(calls: list) -> types.ModuleType:
    m = types.ModuleType("mlflow")
    m.start_run = lambda **kw: calls.append(("start_run", kw))
    m.log_dict = lambda d, name: calls.append(("log_dict", name, d))
    m.log_metrics = lambda d, step: calls.append(("log", step, d))
    m.end_run = lambda: calls.append(("end_run",))
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One SFT run of 2 steps with a held-out share, reporting to all three, its streams a terminal."""
    d = tmp_path_factory.mktemp("report")
    spm = make_spm(d / "spm")
    model, data = make_model(d / "m0", spm), write_jsonl(d / "sft.jsonl", sft_records(24, seed=1))
    wb, mf = [], []
    out, err = Terminal(), Terminal()
    with pytest.MonkeyPatch.context() as mp, one_thread(), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        mp.setitem(sys.modules, "wandb", fake_wandb(wb))
        mp.setitem(sys.modules, "mlflow", fake_mlflow(mf))
        from selfreward.train.sft import main
        main(["--model", str(model), "--data", str(data), "--output", str(d / "run"), "--max-steps", "2",
              "--batch-size", "4", "--max-length", "40", "--eval-fraction", "0.25",
              "--report-to", "tensorboard,wandb,mlflow"])
    return {"dir": d / "run", "metrics": lines(d / "run" / "metrics.jsonl"), "wandb": wb, "mlflow": mf,
            "stdout": out.getvalue(), "stderr": err.getvalue(), "model": model, "data": data}


def expected(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value)]: every number of each record but the step."""
    want: dict[str, list] = {}
    for r in metrics:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(k, []).append((r["step"], float(v)))
    return want


def test_tensorboard_events_read_back_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run["dir"] / "tensorboard"))
    acc.Reload()
    want = expected(run["metrics"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(want)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in pts], rel=1e-6), tag   # events hold float32
    assert [s for s, _ in want["eval_loss"]] == [0, 2] and [s for s, _ in want["loss"]] == [1, 2]


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_wandb_and_mlflow_get_each_record(run, sink):
    calls = run[sink]
    start, *logs, end = calls
    if sink == "mlflow":
        assert start == ("start_run", {"run_name": "run"})
        assert logs[0][:2] == ("log_dict", "config.json") and logs[0][2]["report_to"] == "tensorboard,wandb,mlflow"
        logs = logs[1:]
    else:
        assert start[0] == "init" and start[1]["name"] == "run" and start[1]["config"]["max_steps"] == 2
    assert end in (("finish",), ("end_run",))
    got = [(step, {k: pytest.approx(v) for k, v in d.items()}) for _, step, d in logs]
    assert got == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in run["metrics"]]


def test_terminal_shows_one_updating_line_and_the_held_out_loss(run):
    out, err, m = run["stdout"], run["stderr"], run["metrics"]
    (line,) = [x for x in err.split("\n") if "steps" in x]           # one line, rewritten in place
    assert line.startswith("\r\x1b[K[sft] ") and line.endswith("ETA 0s") and "tok/s" in line
    assert "\r\x1b[K[sft] 2/2 steps loss " in line and " lr " in line
    assert "[sft] step 1/2 loss" not in out and "[sft] step 2/2 loss" not in out
    evals = {r["step"]: r["eval_loss"] for r in m if "eval_loss" in r}
    assert set(evals) == {0, 2}
    for step, v in evals.items():
        assert f"[sft] step {step}/2 eval_loss {v:.4f}\n" in out


def test_a_log_gets_plain_step_lines(run, tmp_path):
    """Not a terminal (a log file): a line per step, no carriage returns."""
    with one_thread():
        code, err, out = run_cli("sft", ["--model", run["model"], "--data", run["data"], "--output", tmp_path / "r",
                                         "--max-steps", "2", "--batch-size", "4", "--max-length", "40"], stdout=True)
    assert code == 0, err
    assert "[sft] step 1/2 loss" in out and "[sft] step 2/2 loss" in out and "\r" not in out + err


@pytest.mark.parametrize("sink", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_package_is_refused_before_any_work(run, tmp_path, monkeypatch, sink):
    monkeypatch.setitem(sys.modules, sink, None)          # as if not installed (import fails, find_spec: None)
    code, err = run_cli("sft", ["--model", run["model"], "--data", run["data"], "--output", tmp_path / "r",
                                "--report-to", f"tensorboard,{sink}"])
    assert (code, err.strip()) == (2, f"error: --report-to {sink}: pip install {sink}")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value,says", [("tensorbord", "did you mean 'tensorboard'?"),
                                        ("none,wandb", "'none' with a dashboard")])
def test_a_bad_name_is_refused(run, tmp_path, value, says):
    code, err = run_cli("sft", ["--model", run["model"], "--data", run["data"], "--output", tmp_path / "r",
                                "--report-to", value])
    assert code == 2 and err.startswith(f"error: --report-to {value!r}") and says in err


def test_the_loops_pass_it_to_each_training_stage(tmp_path, monkeypatch):
    """self_reward's SFT and DPO stages and Humpback's SFT runs: the loop's --report-to, TensorBoard under
    RUN/tensorboard/STAGE, a run name per stage; the trainers' own --dpo-report-to etc. are not flags."""
    from selfreward import cli
    from selfreward.recipes import humpback, self_reward
    from selfreward.recipes.loop_config import LoopConfig
    from selfreward.train.sft import SFTConfig
    got = []
    monkeypatch.setattr(cli, "launch", lambda fn, cfg, *a: got.append(cfg))
    run_dir = tmp_path / "demo"
    cfg = cli.build(LoopConfig, cli.parser(LoopConfig, skip=self_reward.LOOP_SET).parse_args(
        ["--run-dir", str(run_dir), "--base-model", "m0", "--sft-data", "x.jsonl", "--report-to", "tensorboard"]))
    self_reward.stage_sft(cfg)
    (run_dir / "iter_1").mkdir(parents=True)
    write_jsonl(run_dir / "iter_1" / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    self_reward.stage_dpo(cfg, 1)
    hb = humpback.HumpbackConfig(run_dir=str(run_dir), base_model="b", report_to="tensorboard")
    seed = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}])   # read for the paper's batch
    humpback.sft_model(hb, run_dir / "iter_2", [str(seed)], [], 0)
    assert [(c.report_to, c.run_name, c.tensorboard_dir) for c in got] == [
        ("tensorboard", f"demo-{s}", str(run_dir / "tensorboard" / s)) for s in ("sft", "iter_1-dpo", "iter_2")]
    assert isinstance(got[0], SFTConfig) and got[0].output == str(run_dir / "sft")
    for skip, recipe in ((self_reward.LOOP_SET, LoopConfig), (humpback.SET_HERE, humpback.HumpbackConfig)):
        flags = cli.parser(recipe, skip=skip).format_help()
        assert "--report-to" in flags and "--dpo-report-to" not in flags and "--sft-report-to" not in flags
