"""One command for the day a GPU is lent: every kernel against its twin on CUDA (fp32, bf16), kernel vs twin
vs torch.compile timings (the roofline table of benchmarks/README.md), our sampler vs HF generate (bf16, a
~1B random Llama), a DPO and an SFT step under FSDP2 on one GPU (tokens/s, MFU), and the self-rewarding
smoke loop on CUDA with the device each stage's forwards ran on. One JSON and one markdown report.

    python benchmarks/gpu_check.py --out runs/gpu_check          # about 6-8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --out DIR --only kernels,train  # a subset

Without CUDA it says so, writes a report saying so, and exits 0. Every section runs under its own
try/except and time budget, so one failure does not hide the others; the report lists each section's
status, figures and the error if any. Untested: no GPU has run this yet (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("kernels", "timings", "sampler", "train", "smoke")
BUDGET_S = {"kernels": 90, "timings": 120, "sampler": 120, "train": 90, "smoke": 90}   # ~8.5 min at most


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:      # noqa: BLE001 - the report says why
        env["triton"] = f"not importable: {e}"
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {env['time_utc']} UTC", "",
             f"device: {env.get('device', 'none')}; torch {env['torch']}; triton {env['triton']}", ""]
    if not env["cuda"]:
        lines += ["**No CUDA device**: nothing was run (this is the expected result on a CPU machine)."]
        return "\n".join(lines) + "\n"
    lines += ["| section | status | seconds |", "|---|---|---|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', 0):.1f} |")
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if sec.get("error"):
            lines += ["```", sec["error"].strip()[-3000:], "```"]
        for row in sec.get("rows", []):
            lines.append("| " + " | ".join(str(v) for v in row) + " |")
        if sec.get("text"):
            lines += ["```", sec["text"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def run_section(name: str, fn, out: Path) -> dict:
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            res = fn(out, BUDGET_S[name]) or {}
        status = "fail" if res.get("failed") else "ok"
        sec = {"status": status, **res}
    except Exception:           # noqa: BLE001 - recorded in the report, the next section still runs
        sec = {"status": "error", "error": traceback.format_exc()}
    sec["seconds"] = time.perf_counter() - t0
    printed = buf.getvalue()
    if printed:
        sec["text"] = (sec.get("text", "") + printed)[-20000:]
    print(f"[gpu_check] {name}: {sec['status']} ({sec['seconds']:.0f} s)", flush=True)
    return sec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for report.json, report.md and the smoke run")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in a.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        print(f"error: --only {','.join(bad)}: choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    report = {"environment": environment(), "sections": {}}
    if not report["environment"]["cuda"]:
        print("[gpu_check] no CUDA device: nothing to check on this machine (exit 0)")
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import gpu_sections as G
        for name in only:
            report["sections"][name] = run_section(name, getattr(G, name), out)
    from selfreward.records import write_atomic, write_json
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", markdown(report))
    print(f"[gpu_check] report: {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
