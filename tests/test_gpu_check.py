"""benchmarks/gpu_check.py on a machine without CUDA: it says so, writes its report, exits 0. (On a GPU it
runs every section; that path is untested, see benchmarks/README.md.)"""
import json

import pytest
import torch

import gpu_check   # benchmarks/ (pytest's pythonpath)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["environment"]["cuda"] is False and rep["sections"] == {}
    assert "No CUDA device" in (tmp_path / "report.md").read_text()


def test_bad_section_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--only", "kernels,nope"]) == 2
    assert "error: --only nope" in capsys.readouterr().err


def test_report_lists_each_section_with_its_error():
    rep = {"environment": {"time_utc": "t", "torch": "2", "triton": "3", "cuda": True, "device": "H100"},
           "sections": {"kernels": {"status": "ok", "seconds": 1.0, "rows": [["a", "b"], ["---", "---"]]},
                        "train": {"status": "error", "seconds": 2.0, "error": "Traceback: boom"}}}
    md = gpu_check.markdown(rep)
    assert "| kernels | ok | 1.0 |" in md and "| train | error | 2.0 |" in md and "boom" in md


def test_sections_module_imports_on_cpu():
    import gpu_sections
    assert set(gpu_check.SECTIONS) <= set(dir(gpu_sections))
