"""recipes/world/demo: a rerun into the same run folder with other settings is refused (check_run_folder); a bad
loop setting is refused before any training."""
import json

import pytest

from selfreward.recipes.world.demo import DemoConfig, check_run_folder
from selfreward.records import DataError


def test_rerun_with_other_settings_is_refused(tmp_path):
    check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path)))
    rec = json.loads((tmp_path / "demo_settings.json").read_text())
    assert rec["eft_close"] == 0.5 and rec["iterations"] == 2          # the whole config, compared without _RESUMABLE
    check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path)))                       # same: fine
    check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path), iterations=3, threads=1))   # extending: fine
    with pytest.raises(DataError, match=r"demo_settings.json: made with other settings \(eft_close: 0.5 -> 0.0\)"):
        check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path), eft_close=0.0))
    with pytest.raises(DataError, match=r"dpo_lr: 0.0002 -> 1e-06"):
        check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path), dpo_lr=1e-6))
    (tmp_path / "demo_settings.json").write_text("{broken")
    with pytest.raises(DataError, match="unreadable"):
        check_run_folder(tmp_path, DemoConfig(run_dir=str(tmp_path)))


def test_bad_loop_setting_is_refused_before_m0_and_sft(tmp_path):
    from selfreward.cli import ConfigError
    from selfreward.recipes.world import demo
    run, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(ConfigError, match="--judge-self-train -1: must be >= 0"):
        demo.main(["--smoke", "--run-dir", str(run), "--cache-dir", str(cache), "--judge-self-train", "-1"])
    with pytest.raises(ConfigError, match="needs --dpo-nll-alpha > 0"):
        demo.main(["--smoke", "--run-dir", str(run), "--cache-dir", str(cache), "--dpo-nll-alpha", "0"])
    assert not cache.exists() and not (run / "m1").exists()       # no M0 built, no SFT run
