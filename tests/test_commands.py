"""Issue 32, item 6: one console command, `selfreward <command>`, for every entry point. After `pip install -e .`
the script is in the environment's bin and answers --help; every module of the package with a `__main__` block
has a command (a new entry point cannot be forgotten); each command's --help exits 0."""
from __future__ import annotations

import ast
import contextlib
import io
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT
from selfreward import commands

PACKAGE_DIRS = ["", "kernels", "model", "infer", "train", "recipes", "recipes/world"]   # as pyproject's packages


def has_main(path: Path) -> bool:
    """An `if __name__ == "__main__":` block at the module's top level."""
    for node in ast.parse(path.read_text(), str(path)).body:
        t = node.test if isinstance(node, ast.If) else None
        if isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__" and \
                isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value == "__main__":
            return True
    return False


def mains() -> set[str]:
    files = [f for d in PACKAGE_DIRS for f in (ROOT / d).glob("*.py")]
    return {"selfreward." + ".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files if has_main(f)}


def test_every_entry_point_has_a_command():
    found = mains()
    assert {"selfreward.train.sft", "selfreward.infer.sample", "selfreward.model.gguf",
            "selfreward.recipes.world.demo"} <= found                      # the scan sees every folder
    assert found == {m for m, _ in commands.COMMANDS.values()}
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"selfreward": "selfreward.commands:main"}


def test_the_scan_sees_a_new_main(tmp_path):
    (tmp_path / "new.py").write_text('import sys\n\nif __name__ == "__main__":\n    sys.exit(0)\n')
    (tmp_path / "lib.py").write_text('NAME = "__main__"\n')
    assert has_main(tmp_path / "new.py") and not has_main(tmp_path / "lib.py")


def script() -> Path:
    exe = Path(sysconfig.get_path("scripts")) / ("selfreward.exe" if os.name == "nt" else "selfreward")
    assert exe.exists(), f"{exe}: no console script; `pip install -e .` makes it"
    return exe


def test_the_console_script_lists_the_commands():
    r = subprocess.run([str(script()), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: selfreward <command>")
    assert all(f"  {c} " in r.stdout for c in commands.COMMANDS)
    r = subprocess.run([str(script()), "dpp"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: unknown command 'dpp'; did you mean 'dpo'?" in r.stderr


def test_the_console_script_runs_a_trainer_help():
    r = subprocess.run([str(script()), "sft", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--batch-size" in r.stdout and "Supervised fine-tuning" in r.stdout, r.stderr


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")   # runpy: the module was imported
@pytest.mark.parametrize("cmd", list(commands.COMMANDS))
def test_each_command_answers_help(cmd, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))        # the dispatcher sets it, as a console script would
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        commands.main([cmd, "--help"])
    assert e.value.code in (0, None) and "usage:" in out.getvalue()
