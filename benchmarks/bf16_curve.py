"""bf16 training on the CPU against fp32 (issue 30): train/sft.py and train/dpo.py for --steps optimizer steps on a
real model (SmolLM2-135M-Instruct) with OASST text, once in fp32 and once with `--cpu-bf16` (the forward under
torch.autocast(bfloat16); fp32 weights, gradients and AdamW), same data, same order, dropout 0. Prints both loss
curves, their largest and mean relative difference, and each run's per-step time from its metrics.jsonl: the
median over steps 2..N of the wall and the CPU seconds between consecutive steps (CPU seconds: what a step costs
however busy the machine is; benchmarks/README.md, "SmolLM2 shape (issue 30)").

    python benchmarks/bf16_curve.py --model /tmp/smollm2-hf                # 20 steps each, SFT and DPO
    python benchmarks/bf16_curve.py --model /tmp/smollm2-hf --trainers dpo --steps 10 --threads 1

Data: bench_real.py's (the first steps x batch OASST SFT rows / best-vs-worst pairs). JSON to
.cache/bf16_curve/results.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import bench_real

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bf16_curve"


def train(trainer: str, a, data: Path, bf16: bool) -> list[dict]:
    out = CACHE / f"{trainer}_{'bf16' if bf16 else 'fp32'}"
    cmd = [sys.executable, str(ROOT / "train" / f"{trainer}.py"), "--model", a.model, "--data", str(data),
           "--output", str(out), "--overwrite", "--max-steps", str(a.steps), "--batch-size", str(a.batch),
           "--max-length", str(a.max_length), "--no-shuffle", "--dropout", "0", "--log-every", "1"] + \
        (["--cpu-bf16"] if bf16 else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out, ignore_errors=True)
    return [r for r in rows if "loss" in r and "step" in r]


def per_step(rows: list[dict], key: str) -> float:
    """The median over steps 2..N (step 1 holds the warm-up) of the wall seconds between steps (`elapsed_s` counts
    from the start) or of the step's own CPU seconds (`cpu_s`, all threads)."""
    if key == "cpu_s":
        return statistics.median(r[key] for r in rows[1:])
    return statistics.median(b[key] - a[key] for a, b in zip(rows, rows[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--oasst", default=str(ROOT.parent / "shared" / "data" / "oasst_en_100_trees.jsonl"))
    ap.add_argument("--trainers", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2, help="examples (pairs) per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    bench_real.CACHE.mkdir(parents=True, exist_ok=True)
    data = bench_real.make_data(a.oasst, a.steps * a.batch)
    res = {}
    for trainer in a.trainers:
        runs = {p: train(trainer, a, data[trainer], p == "bf16") for p in ("fp32", "bf16")}
        f, b = ([r["loss"] for r in runs[p]] for p in ("fp32", "bf16"))
        rel = [abs(y - x) / abs(x) for x, y in zip(f, b)]
        res[trainer] = {"loss_fp32": f, "loss_bf16": b, "max_rel": max(rel), "mean_rel": statistics.mean(rel),
                        **{f"{p}_{k}": per_step(runs[p], k) for p in runs for k in ("elapsed_s", "cpu_s")}}
        print(f"\n{trainer.upper()}: {a.steps} steps of {a.batch}, max {a.max_length} tokens, {a.threads} threads")
        print("| step | fp32 loss | bf16 loss | relative difference |\n|---|---|---|---|")
        for i, (x, y, r) in enumerate(zip(f, b, rel)):
            print(f"| {i + 1} | {x:.4f} | {y:.4f} | {r:.4f} |")
        r = res[trainer]
        print(f"max relative difference {r['max_rel']:.4f}, mean {r['mean_rel']:.4f}; per step (median of steps "
              f"2..{a.steps}): fp32 {r['fp32_elapsed_s']:.2f} s ({r['fp32_cpu_s']:.2f} CPU s), bf16 "
              f"{r['bf16_elapsed_s']:.2f} s ({r['bf16_cpu_s']:.2f} CPU s): {r['fp32_cpu_s'] / r['bf16_cpu_s']:.2f}x "
              f"CPU, {r['fp32_elapsed_s'] / r['bf16_elapsed_s']:.2f}x wall", flush=True)
    (CACHE / "results.json").write_text(json.dumps({"args": vars(a), "results": res}, indent=1))


if __name__ == "__main__":
    main()
