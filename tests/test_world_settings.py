"""recipes/world/demo.check_settings: a rerun into the same run folder with other settings is refused."""
import json

import pytest

from selfreward.cli import ConfigError
from selfreward.recipes.world.demo import DemoConfig, check_settings


def test_rerun_with_other_settings_is_refused(tmp_path):
    check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path)))
    rec = json.loads((tmp_path / "demo_settings.json").read_text())
    assert rec["eft_close"] == 0.5 and "run_dir" not in rec and "iterations" not in rec
    check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path)))                       # same: fine
    check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path), iterations=3, threads=1))   # extending: fine
    with pytest.raises(ConfigError, match=r"demo_settings.json: field 'eft_close' was 0.5, now 0.0"):
        check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path), eft_close=0.0))
    with pytest.raises(ConfigError, match=r"field 'dpo_lr'"):
        check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path), dpo_lr=1e-6))
    (tmp_path / "demo_settings.json").write_text("{broken")
    with pytest.raises(ConfigError, match="unreadable"):
        check_settings(tmp_path, DemoConfig(run_dir=str(tmp_path)))
