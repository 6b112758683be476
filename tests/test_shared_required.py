"""Issue 13 item 13: a test that needs ../shared skips on a fresh clone but fails under CI's
SRLM_REQUIRE_SHARED=1; .ci/run sets it; the fixtures of our own are in tests/data and small."""
import pytest

import conftest as conftest
from conftest import DATA, OASST_20, ROOT, TOKENIZER_DIR


def test_missing_shared_skips_or_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no_shared")
    monkeypatch.delenv("SRLM_REQUIRE_SHARED", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.need_shared("data/oasst_en_100_trees.jsonl")
    monkeypatch.setenv("SRLM_REQUIRE_SHARED", "1")
    with pytest.raises(pytest.fail.Exception, match="SRLM_REQUIRE_SHARED"):
        conftest.need_shared("data/oasst_en_100_trees.jsonl")


def test_ci_requires_shared():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    req = [i for i, x in enumerate(lines) if x.strip().startswith("export SRLM_REQUIRE_SHARED=1")]
    call = [i for i, x in enumerate(lines) if "scripts/test.sh" in x and not x.lstrip().startswith("#")]
    assert req and call and req[0] < call[0]


def test_own_fixtures_small_and_usable():
    from selfreward.model.tokenizer import Tokenizer
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 1 << 20, size
    assert sum(1 for _ in open(OASST_20)) == 20
    tok = Tokenizer.load(TOKENIZER_DIR)
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
