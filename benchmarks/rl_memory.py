"""Where train/rl.py's memory goes (issue 29): runs it as a child process, reads the child's RSS every second from
/proc, and prints each log line with the RSS at that moment and the peak so far, then the peak. Linux only.

    python benchmarks/rl_memory.py --model SMOLLM2 --data RUN/sets/train.jsonl                 # the real demo's RL
    python benchmarks/rl_memory.py --model SMOLLM2 --data RUN/sets/train.jsonl -- --activation-checkpointing

The RL settings are the real demo's (recipes/real_demo.py): batch 8 prompts x 4 samples, micro-batch 2, 256 new
tokens, RLOO, the IFEval partial reward, bf16 on the CPU's matrix units; 2 steps. Flags after `--` go to
train/rl.py as they are.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="prompts JSONL with IFEval instructions (recipes/verifiable.py)")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = tempfile.mkdtemp(prefix="rl_memory.")
    cmd = [sys.executable, "-m", "selfreward.train.rl", "--model", a.model, "--data", a.data, "--output", out,
           "--max-steps", str(a.steps), "--batch-size", "8", "--micro-batch-size", "2", "--num-samples", "4",
           "--lr", "5e-5", "--beta", "0.05", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "256",
           "--estimator", "rloo", "--reward", "ifeval-partial", "--reward-template", a.data, "--cpu-bf16",
           "--engine-dtype", "bfloat16", "--mixed-precision", *extra]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak, now = [0.0], [0.0]

    def sample():
        while p.poll() is None:
            now[0] = rss_gb(p.pid)
            peak[0] = max(peak[0], now[0])
            time.sleep(1)
    threading.Thread(target=sample, daemon=True).start()
    for line in p.stdout:
        for part in line.rstrip("\n").split("\r"):          # the progress line's updates too
            if part.strip():
                print(f"{time.perf_counter() - t0:6.0f}s  RSS {now[0]:5.2f} GB  peak {peak[0]:5.2f} GB | {part}",
                      flush=True)
    rc = p.wait()
    print(f"peak RSS {peak[0]:.2f} GB (sampled every second), {time.perf_counter() - t0:.0f} s, exit {rc}; "
          f"run folder {out}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
