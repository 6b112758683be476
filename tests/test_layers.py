"""The house's shape, checked: imports only point down the layers (lazy imports inside functions included),
and no core file is over 300 lines.

Layers, bottom up: the root modules (records, units, ranges, provenance, cli, nodes, config_files, commands,
progress) < kernels < model < {infer, train} < recipes < recipes/world. infer and train are siblings: neither imports
the other, but for one named seam, the RL trainer's sampler (train/rollout.py drives infer's engine).
"""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

LAYERS = {"records": 0, "units": 0, "ranges": 0, "provenance": 0, "cli": 0, "nodes": 0, "progress": 0, "config_files": 0,
          "commands": 0, "kernels": 1, "model": 2, "infer": 3, "train": 3, "recipes": 4, "recipes.world": 5}
SEAMS = {("train/rollout.py", "infer")}
CORE = ("kernels", "model", "infer", "train", "recipes")
ROOT_MODULES = ("records.py", "units.py", "ranges.py", "provenance.py", "cli.py", "nodes.py", "progress.py",
                "config_files.py", "commands.py")


def layer(module: str) -> tuple[str, int] | None:
    """('recipes.world', 6) for 'recipes.world.demo'; None for a module outside the package's layers."""
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name, LAYERS[name]
    return None


def own_layer(root: Path, path: Path) -> tuple[str, int]:
    rel = path.relative_to(root).with_suffix("")
    return layer(".".join(rel.parts)) or ("", 0)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `selfreward.*` import in the file, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods = [node.module] if node.module != "selfreward" else [f"selfreward.{a.name}" for a in node.names]
            out += [(node.lineno, m) for m in mods]
    return [(ln, m.split(".", 1)[1]) for ln, m in out if m.startswith("selfreward.")]


def sources(root: Path) -> list[Path]:
    return sorted([p for d in CORE for p in (root / d).rglob("*.py")] + [root / m for m in ROOT_MODULES])


def upward_edges(root: Path) -> list[str]:
    bad = []
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        mine, lo = own_layer(root, path)
        for ln, mod in imports(path):
            got = layer(mod)
            sideways = got and got[1] == lo > 0 and got[0] != mine          # infer <-> train
            if got and (got[1] > lo or sideways) and (rel, got[0]) not in SEAMS:
                bad.append(f"{rel}:{ln}: {mine or 'root'} imports {mod} ({got[0]} is not below it)")
    return bad


def core_files(root: Path) -> list[Path]:
    return [p for p in sources(root) if "world" not in p.relative_to(root).parts]


def test_imports_only_point_down():
    assert upward_edges(ROOT) == []


def test_no_core_file_over_300_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in core_files(ROOT)
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


@pytest.mark.parametrize("where,line,found", [
    ("model/planted.py", "from selfreward.recipes.judge import judge_prompt", True),        # a top-level import
    ("infer/planted.py", "def f():\n    import selfreward.train.loop\n", True),             # a lazy one
    ("recipes/planted.py", "def f():\n    from selfreward.recipes.world import checker\n", True),
    ("train/planted.py", "from selfreward.infer.sequence import SamplingParams", True),      # only rollout.py may
    ("train/rollout.py", "from selfreward.infer.sequence import SamplingParams", False),     # the named seam
    ("recipes/world/planted.py", "from selfreward.recipes.judge import judge_prompt", False),   # downward: fine
])
def test_a_planted_upward_import_is_caught(tmp_path, where, line, found):
    for d in CORE:
        (tmp_path / d / "world").mkdir(parents=True, exist_ok=True)
    for m in ROOT_MODULES:
        (tmp_path / m).write_text("")
    (tmp_path / where).write_text(line + "\n")
    edges = upward_edges(tmp_path)
    assert bool(edges) == found and all(where in e for e in edges)
