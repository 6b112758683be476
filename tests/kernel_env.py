"""What every Triton-kernel test file shares: run only under TRITON_INTERPRET=1 with triton installed
(scripts/test.sh runs these files in their own pytest process with it set), and with the kernel switch on
its default (SRLM_KERNELS unset) in every test.

    from kernel_env import require_interpreter, _on_kernels  # noqa: F401  (the autouse fixture)
    require_interpreter()
"""
import os

import pytest


def require_interpreter() -> None:
    """Call at module level: skips the whole file unless the Triton interpreter can run it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernel tests need TRITON_INTERPRET=1 in the environment (bash scripts/test.sh sets it)",
                    allow_module_level=True)
    pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _on_kernels(monkeypatch):
    monkeypatch.delenv("SRLM_KERNELS", raising=False)
