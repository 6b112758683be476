"""The torchrun side of tests/test_infer_tp.py (4 ranks, gloo): TP engines on tiny checkpoints, the FSDP2
-> TP hand-off, then infer/sample.py --tensor-parallel 2 in-process. Each rank writes what it produced to
OUT/rank<r>.json; the test compares it with references computed outside (transformers, the 1-rank engine).

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/tp_worker.py SPEC.json OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from selfreward.infer.config import EngineConfig, load_engine
from selfreward.infer.engine import Engine
from selfreward.infer.parallel import init_tp, tp_model
from selfreward.infer.sequence import SamplingParams


def run_engine(eng: Engine, case: dict) -> dict:
    prompts, steps = case["prompts"], case["steps"]
    greedy = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    sp = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=steps, seed=7, ignore_eos=True, logprobs=True)
    sampled = eng.generate(prompts, sp, n=2)
    out = {"greedy": [c[0].token_ids for c in greedy],
           "sampled": [[s.token_ids for s in c] for c in sampled],
           "sampled_logprobs": [[s.logprobs for s in c] for c in sampled],
           "score": eng.score(prompts, [g[0].token_ids[:5] for g in greedy]),
           "next": eng.next_token_logprobs(prompts, [3, 4, 5]).tolist(),
           "pool_kv_heads": eng.runner.kv_caches[0][0].shape[2]}
    ids = torch.tensor(case["batch_ids"])
    with torch.inference_mode():
        out["logits"] = eng.model.forward_batch(ids, torch.tensor(case["batch_mask"])).tolist()
    return out


def handoff(spec: dict, tp, out: dict) -> None:
    """Train one AdamW step under FSDP2 on all ranks, export it, and hand the weights to a TP engine."""
    from torch.distributed.device_mesh import init_device_mesh
    from selfreward.model.checkpoint import load_model
    from selfreward.train.checkpointing import export_model
    from selfreward.train.parallel import Dist, apply_fsdp
    h = spec["handoff"]
    d = Dist(dist.get_rank(), dist.get_world_size(), torch.device("cpu"),
             init_device_mesh("cpu", (dist.get_world_size(),)))
    model = load_model(h["ckpt"])
    apply_fsdp(model, d, mixed_precision=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor(h["train_ids"])
    model.forward_batch(ids).logsumexp(-1).mean().backward()    # the same batch on every rank
    opt.step()
    export_model(model, h["export"], None, d)
    eng = Engine(tp_model(model.cfg, tp), block_size=4, num_blocks=64)
    for p in eng.model.parameters():
        p.data.fill_(float("nan"))           # a weight the hand-off missed would show
    stat = eng.load_weights(model)
    print(f"[handoff] rank {d.rank}: {stat['bytes']} bytes into the TP {tp.size} engine in "
          f"{stat['seconds'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    out["handoff"] = run_engine(eng, h["case"])
    out["handoff"]["seconds"] = stat["seconds"]
    eng2 = load_engine(h["export"], EngineConfig(device="cpu", tensor_parallel=tp.size, block_size=4, num_blocks=64))
    out["exported"] = run_engine(eng2, h["case"])


def main(spec_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank = dist.get_rank()
    groups = {2: init_tp(2), 4: init_tp(4)}
    out: dict = {}
    for case in spec["cases"]:
        tp = groups[case["tp"]]
        if case.get("replica") not in (None, tp.replica):
            continue
        eng = load_engine(case["ckpt"], EngineConfig(device="cpu", tensor_parallel=tp.size, block_size=4, num_blocks=64))
        out[case["name"]] = dict(run_engine(eng, case), bytes=eng.model.loaded_bytes, replica=tp.replica)
    handoff(spec, groups[2], out)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    from selfreward.infer import sample
    rc = sample.main(spec["sample_argv"])   # in the process group made above
    Path(out_dir, f"rank{rank}.rc").write_text(str(rc))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
