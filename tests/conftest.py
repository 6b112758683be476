import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need_shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"../shared/{rel} is absent (fresh clone without shared/)")
    return p


@pytest.fixture
def stories260k() -> Path:
    return need_shared("fixtures/stories260k")


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and on a shared machine two spinning threads can be 8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
