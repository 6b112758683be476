import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = ROOT / "tests" / "data"          # small fixtures of our own, present in every clone (tests/data/README.md)
OASST_20 = DATA / "oasst_20_trees.jsonl"
TOKENIZER_DIR = DATA / "stories260k_tokenizer"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need_shared(rel: str) -> Path:
    """A path under ../shared. Absent: skip on a fresh clone, but FAIL when SRLM_REQUIRE_SHARED=1 (CI sets it
    in .ci/run), so a CI machine that lost ../shared cannot pass by skipping a dozen tests."""
    p = SHARED / rel
    if not p.exists():
        msg = f"../shared/{rel} is absent"
        if os.environ.get("SRLM_REQUIRE_SHARED") == "1":
            pytest.fail(f"{msg} and SRLM_REQUIRE_SHARED=1 (CI) asks for it", pytrace=False)
        pytest.skip(f"{msg} (fresh clone without shared/)")
    return p


@pytest.fixture
def stories260k() -> Path:
    return need_shared("fixtures/stories260k")


@pytest.fixture
def sp_tokenizer() -> Path:
    """The stories260K SentencePiece tokenizer alone (tests/data, in every clone): for tests of tokens only."""
    return TOKENIZER_DIR


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and on a shared machine two spinning threads can be 8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
