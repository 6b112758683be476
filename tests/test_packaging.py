"""issue 27: the checkout hides no installed package, every import's package is declared, and the wheel that
`pip install .` builds holds every module and the M0 the world demo ships with.

These hold in the environment the suite runs in: CI runs it twice, on the versions in constraints.txt and on the
newest releases (.ci/run), so a package that starts to collide with one of our module names, or a new import we
forgot to declare, fails here and not on a user's machine."""
from __future__ import annotations

import ast
import importlib.metadata as md
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE_DIRS = ["kernels", "model", "infer", "train", "recipes", "recipes/world"]
# Folders that land on sys.path: the root (the working directory under python -m / -c and pytest), the folders
# of the scripts users run by path (torchrun train/dpo.py puts train/ first), and pytest's pythonpath.
ON_SYS_PATH = ["", "train", "infer", "benchmarks", "tests"]


def exposed_names(folder: Path) -> dict[str, Path]:
    """Top-level names a folder on sys.path would answer: its modules and its regular packages (a subfolder
    without __init__.py is only a namespace portion: any installed package of that name wins over it)."""
    out = {p.stem: p for p in folder.glob("*.py") if p.name != "__init__.py"}
    out.update({p.name: p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()})
    return out


def installed_names() -> set[str]:
    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names |= set(md.packages_distributions())
    site = [p for p in sys.path if p.endswith("-packages")]
    names |= {m.name for m in pkgutil.iter_modules(site)}
    return {n for n in names if not n.startswith("__editable__") and n != "selfreward"}


def test_no_name_in_the_checkout_hides_an_installed_module():
    taken = installed_names()
    assert {"kernels", "transformers", "torch"} <= taken      # the scan sees site-packages and PyPI's kernels
    clashes = [f"{where or '.'}/{name} hides {name!r}" for where in ON_SYS_PATH
               for name in exposed_names(ROOT / where) if name in taken]
    assert not clashes, clashes
    for d in PACKAGE_DIRS + ["benchmarks", "tests"]:          # the folders are namespace portions, on purpose
        assert not (ROOT / d / "__init__.py").exists(), f"{d}/__init__.py would hide an installed {d!r}"


def test_planted_clash_is_seen(tmp_path):
    """The scan above can fail: a folder holding kernels/__init__.py (the old layout) and a module `json.py`."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "model").mkdir()                                # a namespace portion: no clash
    assert set(exposed_names(tmp_path)) & installed_names() == {"kernels", "json"}


def _deps(spec: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].strip().lower().replace("_", "-") for s in spec}


def _declared() -> dict[str, set[str]]:
    tomllib = pytest.importorskip("tomllib")
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: _deps(v) for k, v in proj["optional-dependencies"].items()}
    return {"core": _deps(proj["dependencies"]), **extras}


def _imports(files) -> dict[str, set[str]]:
    """Top-level module -> files that import it (lazy imports inside functions included)."""
    out: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for m in mods:
                out.setdefault(m.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return out


def _dist(module: str) -> str:
    """The distribution that provides a module: the installed one's metadata, else the module's own name."""
    dists = md.packages_distributions().get(module)
    return (dists[0] if dists else module).lower().replace("_", "-")


@pytest.mark.parametrize("part,allowed", [
    ("package", ["core", "gpu", "plot", "gguf", "real", "data", "tensorboard", "wandb", "mlflow", "vllm"]),   # core, and
    # the optional extras the package imports lazily
    ("tests", ["core", "gpu", "plot", "gguf", "dev"]),
    ("benchmarks", ["core", "gpu", "plot", "bench", "vllm"]),
])
def test_every_import_has_its_package_declared(part, allowed):
    declared = _declared()
    ok = set().union(*(declared[k] for k in allowed))
    files = {"package": [f for d in [""] + PACKAGE_DIRS for f in (ROOT / d).glob("*.py")],
             "tests": list((ROOT / "tests").glob("*.py")),
             "benchmarks": list((ROOT / "benchmarks").glob("*.py"))}[part]
    ours = {"selfreward"} | {f.stem for d in ("tests", "benchmarks") for f in (ROOT / d).glob("*.py")}
    std = set(sys.stdlib_module_names)
    missing = {m: sorted(where) for m, where in _imports(files).items()
               if m not in std and m not in ours and _dist(m) not in ok}
    assert not missing, f"imported but not declared in pyproject.toml ({'/'.join(allowed)}): {missing}"


def test_wheel_holds_every_module_and_the_shipped_m0(tmp_path):
    """What `pip install .` installs: the wheel that pip builds (build isolation, as a user's), from a copy of the
    checkout without build leftovers (a stale build/lib could hold a module the package list misses)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".git", "runs",
                                                              ".cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = tmp_path.glob("selfreward-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    want = {f"selfreward/{f.relative_to(ROOT)}" for d in [""] + PACKAGE_DIRS for f in (ROOT / d).glob("*.py")}
    want |= {f"selfreward/{f.relative_to(ROOT)}" for f in (ROOT / "recipes" / "world" / "m0").iterdir()}
    assert "selfreward/recipes/world/m0/model.safetensors" in want
    assert want <= names, sorted(want - names)
