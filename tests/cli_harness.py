"""Run an entry point exactly as its `__main__` does (runpy: the module's or script's own `if __name__ ==
"__main__"` block, with sys.argv set), in this process so a test pays no interpreter start-up; -> (exit
code, stderr[, stdout]). An exception that escapes the entry point is returned as code "traceback" with its text, so
a test can assert that a user error never reaches the user as a Python traceback."""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
import traceback
import warnings
from pathlib import Path

import selfreward

ROOT = Path(selfreward.__file__).resolve().parent     # the package's own scripts, wherever it is imported from

SCRIPTS = {"sample": ROOT / "infer" / "sample.py", "sft": ROOT / "train" / "sft.py", "dpo": ROOT / "train" / "dpo.py",
           "rm": ROOT / "train" / "rm.py", "rl": ROOT / "train" / "rl.py"}
MODULES = {"oasst": "selfreward.recipes.oasst", "self_reward": "selfreward.recipes.self_reward",
           "evaluate": "selfreward.recipes.evaluate", "humpback": "selfreward.recipes.humpback",
           "rlaif": "selfreward.recipes.rlaif", "world_demo": "selfreward.recipes.world.demo",
           "select": "selfreward.recipes.select"}


def run_cli(name: str, argv: list[str], stdout: bool = False) -> tuple:
    argv = [str(a) for a in argv]
    err, out = io.StringIO(), io.StringIO()
    old = sys.argv
    code: int | str = 0
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    try:
        for k in env:
            os.environ.pop(k, None)
        sys.argv = [str(SCRIPTS.get(name, name))] + argv
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # runpy: "found in sys.modules" for a module
            try:
                if name in SCRIPTS:
                    runpy.run_path(str(SCRIPTS[name]), run_name="__main__")
                else:
                    runpy.run_module(MODULES[name], run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else f"exit {e.code!r}")
            except BaseException:
                code = "traceback"
                err.write(traceback.format_exc())
    finally:
        sys.argv = old
        for k, v in env.items():
            if v is not None:
                os.environ[k] = v
    return (code, err.getvalue(), out.getvalue()) if stdout else (code, err.getvalue())
