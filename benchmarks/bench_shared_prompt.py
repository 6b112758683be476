"""Shared-prompt DPO vs the unshared layout, A/B in one process: forward + backward of the policy's summed
response log-probs (random ~56M Llama of benchmarks/bench_dpo.py, 4 random pairs), the layouts alternating
--reps times, median process CPU time each (robust to a loaded machine, unlike wall time).

    OMP_NUM_THREADS=1 python benchmarks/bench_shared_prompt.py --prompt 512 --resp 128 --reps 3

plain: unshared, no checkpointing; shared: share_prompt; *_sac: with selective activation checkpointing.
Dropout 0.1 (the trainers' default).
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from selfreward.model.checkpoint import load_model
from selfreward.train.data import Pair, pair_batch
from selfreward.train.losses import sequence_logps
from selfreward.train.parallel import apply_checkpointing

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--resp", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_dpo
    path = ROOT / ".cache" / "bench_dpo" / "model"
    bench_dpo.make_checkpoint(path)
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, 32000) for _ in range(n)]    # noqa: E731
    pairs = [Pair([1] + ids(a.prompt - 1), ids(a.resp - 1) + [2], ids(a.resp - 1) + [2]) for _ in range(4)]
    m = load_model(path).train()
    ms = load_model(path).train()
    apply_checkpointing(ms, selective=True)
    res: dict[str, list[float]] = {}
    for _ in range(a.reps):
        for name, model, share in (("plain", m, False), ("shared", m, True), ("unshared_sac", ms, False),
                                   ("shared_sac", ms, True)):
            b = pair_batch(pairs, share)
            t0 = time.process_time()
            sequence_logps(model, b).sum().backward()
            res.setdefault(name, []).append(time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"prompt {a.prompt} + {a.resp} + {a.resp}, 4 pairs, threads {torch.get_num_threads()}, "
          f"tokens: unshared {pair_batch(pairs, False).tokens.numel()}, shared {pair_batch(pairs).tokens.numel()}")
    for k, v in res.items():
        print(f"{k:13s} median {med[k]:.2f} s CPU  runs {[round(x, 2) for x in v]}")
    print(f"shared over plain {med['plain'] / med['shared']:.2f}x; shared_sac over unshared_sac "
          f"{med['unshared_sac'] / med['shared_sac']:.2f}x; selective checkpointing costs "
          f"{med['shared_sac'] / med['shared'] - 1:+.0%} (shared)")


if __name__ == "__main__":
    main()
