"""train/dpo.py's start-up check of --dropout against the reference: a warning when dropout moves the policy's
log-probs far from the reference's (a checkpoint trained without dropout), none without dropout, and the
check leaves the dropout masks training draws as they were (the losses equal those of a run without it)."""
import json

import pytest

from test_train_fixtures import dpo_records, make_model, make_spm, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dropcheck")
    model = make_model(d / "m0", make_spm(d / "spm"))
    return model, write_jsonl(d / "pairs.jsonl", dpo_records(8))


def _run(setup, out, dropout, capsys):
    from selfreward.train.dpo import DPOConfig, train
    model, data = setup
    train(DPOConfig(model=str(model), data=[str(data)], output=str(out), max_steps=2, batch_size=4, max_length=64,
                    dropout=dropout, lr=1e-3, final_lr=1e-3, log_every=1, seed=3))
    printed = capsys.readouterr().out
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()], printed


def test_shift_grows_with_dropout_and_warns_above_the_limit(setup, tmp_path, capsys, monkeypatch):
    """A random tiny model barely cares about residual dropout (shifts of 0.01-0.1 nat per token; SmolLM2-135M:
    train/README.md), so the limit is lowered here to see the warning; without dropout there is no check."""
    import selfreward.train.dpo as dpo
    real, shifts = dpo.warn_dropout_shift, []
    monkeypatch.setattr(dpo, "warn_dropout_shift", lambda *a, **k: shifts.append(real(*a, limit=0.005)) or shifts[-1])
    _, quiet = _run(setup, tmp_path / "a", 0.001, capsys)
    _, printed = _run(setup, tmp_path / "b", 0.5, capsys)
    assert 0 < shifts[0] < 0.005 < shifts[1] and "warning: --dropout" not in quiet
    assert f"[dpo] warning: --dropout 0.5 moves this checkpoint's log-probs by {shifts[1]:.2f} nats" in printed
    _, printed = _run(setup, tmp_path / "c", 0.0, capsys)
    assert len(shifts) == 2 and "warning: --dropout" not in printed


def test_the_check_draws_no_dropout_mask_of_training(setup, tmp_path, capsys, monkeypatch):
    import selfreward.train.dpo as dpo
    with_check, _ = _run(setup, tmp_path / "c", 0.1, capsys)
    calls = []
    monkeypatch.setattr(dpo, "warn_dropout_shift", lambda *a, **k: calls.append(1))
    without, _ = _run(setup, tmp_path / "d", 0.1, capsys)
    assert calls == [1] and with_check == without
