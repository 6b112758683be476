"""Where a DPO step's memory goes: the whole process's peak RSS (VmHWM, never reset) after loading and
after each of 3 steps (forward + backward + clipping + AdamW), one fresh process per layout:

    plain      every response with its own copy of the prompt, no checkpointing (the trainer before issue 20)
    shared     the prompt once per pair (train.data.pair_batch share_prompt)
    shared_sac shared + selective activation checkpointing (train/dpo.py's default)

    python benchmarks/dpo_memory.py --prompt 256 --resp 256

Same random ~56M Llama and random pairs (4 per step) as benchmarks/bench_dpo.py; default environment
(threads, allocator). The first step has no AdamW state yet; the growth after it is the optimizer state
(0.45 GB) plus what the allocator keeps.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hwm_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return 0


def child(layout: str, prompt: int, resp: int) -> None:
    import torch
    from selfreward.model.checkpoint import load_model
    from selfreward.train.data import Pair, pair_batch
    from selfreward.train.losses import DPOLossConfig, dpo_loss, sequence_logps
    from selfreward.train.parallel import apply_checkpointing
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, 32000) for _ in range(n)]    # noqa: E731
    pairs = [Pair([1] + ids(prompt - 1), ids(resp - 1) + [2], ids(resp - 1) + [2]) for _ in range(4)]
    model = load_model(ROOT / ".cache" / "bench_dpo" / "model").train()
    out = [f"{layout}: after load {hwm_mb()} MB"]
    if layout == "shared_sac":
        apply_checkpointing(model, selective=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    b = pair_batch(pairs, layout != "plain")
    for s in range(3):
        t0 = time.perf_counter()
        lp = sequence_logps(model, b)
        loss = dpo_loss(lp, lp.detach() - 1, b.resp_len, DPOLossConfig())[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(f"step {s + 1} {hwm_mb()} MB ({time.perf_counter() - t0:.1f} s wall)")
    print(f"| {layout} | {b.tokens.numel()} | " + " | ".join(out) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--resp", type=int, default=256)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.prompt, a.resp)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_dpo
    bench_dpo.make_checkpoint(ROOT / ".cache" / "bench_dpo" / "model")
    print("| layout | tokens per step | whole-process peak RSS after load, then after each step |")
    print("|---|---|---|")
    for layout in ("plain", "shared", "shared_sac"):
        subprocess.run([sys.executable, __file__, "--child", layout, "--prompt", str(a.prompt),
                        "--resp", str(a.resp)], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
