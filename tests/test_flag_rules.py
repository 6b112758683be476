"""Every entry point's numeric flags are checked at the door (issue 33): NaN and inf refused, every value its rule
refuses refused, each error naming the flag; and docs/flags.md is what tests/flag_rules.py generates now."""
from pathlib import Path

import pytest

import flag_rules

DOC = Path(__file__).resolve().parents[1] / "docs" / "flags.md"


@pytest.fixture(scope="module")
def survey():
    return flag_rules.survey()


def test_every_entry_point_probed(survey):
    for name, (flags, base) in survey.items():
        assert base[2].startswith(("MISSING", "--output UNWRITABLE")) or "UNWRITABLE" in base[2], \
            f"{name}: its required flags alone must stop at the missing file, not at {base}"
        nums = [f for f in flags if f.kind in ("int", "float")]
        assert nums and all(f.probes for f in nums), name


def test_every_entry_point_is_listed():
    """A module with a command-line main (`if __name__ == "__main__"`) is one of flag_rules.ENTRIES."""
    root = DOC.parents[1]
    mains = {".".join(("selfreward",) + p.relative_to(root).with_suffix("").parts)
             for d in ("infer", "train", "recipes") for p in (root / d).rglob("*.py")
             if 'if __name__ == "__main__"' in p.read_text()}
    via_demo = {"selfreward.recipes.world.rlaif", "selfreward.recipes.world.humpback"}   # demo --method X
    assert mains - {e.module for e in flag_rules.ENTRIES} - via_demo == set()


def test_no_numeric_flag_lets_a_bad_value_through(survey):
    found = {}
    for name, (flags, _) in survey.items():
        for f in flags:
            for p in flag_rules.problems(name, f):
                found.setdefault((name, f.name), []).append(p)
    for f in (f for flags, _ in survey.values() for f in flags if f.kind == "float"):
        assert {"nan", "inf"} <= set(f.probes), f.name
    new = [p for k, ps in found.items() if k not in flag_rules.KNOWN for p in ps]
    assert not new, "flags the door lets through (or refuses without naming):\n" + "\n".join(new)
    fixed = [k for k in flag_rules.KNOWN if k not in found]
    assert not fixed, f"no longer a problem: remove from flag_rules.KNOWN: {fixed}"


def test_doc_is_generated(survey):
    assert DOC.read_text(encoding="utf-8") == flag_rules.markdown(survey) + "\n", \
        "docs/flags.md is stale: python tests/flag_rules.py --write docs/flags.md"
