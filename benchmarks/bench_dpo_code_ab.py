"""One DPO step of two versions of the code, one thread, process CPU: run it once with PYTHONPATH pointing at
each tree (e.g. main's and a branch's), alternating. A step: shared prompt, selective checkpointing, the
reference from a table scored first (one batch of it timed too), dropout 0, 4 pairs of --prompt + 2 x --resp.
`old` = the autograd head and the per-op AdamW (any tree); `new` = train/dpo_head.py and fused AdamW.

    PYTHONPATH=/tmp/pp-main python benchmarks/bench_dpo_code_ab.py 256 256 old    # one JSON line each
    PYTHONPATH=/tmp/pp-20d  python benchmarks/bench_dpo_code_ab.py 256 256 new
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402
from selfreward.model.checkpoint import load_model  # noqa: E402
from selfreward.train.data import Pair, pair_batch  # noqa: E402
from selfreward.train.losses import DPOLossConfig, compute_reference, dpo_loss, sequence_logps  # noqa: E402
from selfreward.train.parallel import apply_checkpointing  # noqa: E402


def main() -> None:
    P, R, new = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "new"
    torch.set_num_threads(1)
    bench_dpo.make_checkpoint(bench_dpo.CACHE / "model")
    bench_dpo.PROMPT, bench_dpo.RESP = P, R
    pairs = [Pair(*p) for p in bench_dpo.make_pairs(3)]
    m = load_model(bench_dpo.CACHE / "model").train()
    c = time.process_time()
    table = compute_reference(m, pairs, list(range(12)), 4, True)             # [12, 2]
    ref_batch = (time.process_time() - c) / 3
    apply_checkpointing(m, selective=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6, **({"fused": True} if new else {"foreach": False}))
    cfg = DPOLossConfig("sigmoid", 0.1)
    out = []
    for s in range(3):
        b = pair_batch(pairs[4 * s:4 * s + 4], True)
        t = table[4 * s:4 * s + 4]
        rf = torch.cat([t[:, 0], t[:, 1]])                                    # [8] chosen first
        c = time.process_time()
        if new:
            from selfreward.train.dpo_head import pair_head_loss
            loss = pair_head_loss(m, b, lambda lp, sub: dpo_loss(lp, rf[sub], b.resp_len[sub], cfg))[0] / 4
        else:
            loss = dpo_loss(sequence_logps(m, b), rf, b.resp_len, cfg)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.process_time() - c)
    import selfreward
    print(json.dumps({"code": "new" if new else "old", "tree": selfreward.__file__, "shape": [P, R],
                      "step_cpu_s": out, "ref_batch_cpu_s": ref_batch}), flush=True)


if __name__ == "__main__":
    main()
