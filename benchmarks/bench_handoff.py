"""FSDP2 trainer -> TP engine weight hand-off, against the disk round trip it replaces.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/bench_handoff.py --tp 2 [--hidden 1024 --layers 8 --out /tmp/handoff]

Every rank: a random Llama (fp32) under FSDP2 over all ranks, a TP engine (tensor parallel --tp); then
(a) `Engine.load_weights` (one full parameter at a time over the mesh, sliced) and (b) the
round trip it replaces: `train.checkpointing.export_model` to --out, then `infer.config.load_engine`
from it (sharded load). Prints both times (rank 0) and checks the two engines hold equal weights.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Config:
    tp: int = 2
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    vocab: int = 32000
    out: str = "/tmp/bench_handoff"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in vars(Config()).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    cfg = Config(**vars(ap.parse_args()))
    from torch.distributed.device_mesh import init_device_mesh
    from selfreward.infer.engine import Engine
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.infer.parallel import init_tp, tp_model
    from selfreward.model.config import ModelConfig
    from selfreward.model.llama import Transformer
    from selfreward.train.checkpointing import export_model
    from selfreward.train.parallel import Dist, apply_fsdp

    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    rank, world = dist.get_rank(), dist.get_world_size()
    mcfg = ModelConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       intermediate_size=cfg.intermediate)
    model = Transformer(mcfg)
    model.init_weights(seed=0)
    n = sum(p.numel() for p in model.parameters())
    d = Dist(rank, world, torch.device("cpu"), init_device_mesh("cpu", (world,)))
    apply_fsdp(model, d, mixed_precision=False)
    tp = init_tp(cfg.tp)
    eng = Engine(tp_model(mcfg, tp), block_size=16, num_blocks=16)

    dist.barrier()
    stat = eng.load_weights(model)
    t_handoff = stat["seconds"]

    dist.barrier()
    t0 = time.perf_counter()
    export_model(model, cfg.out, None, d)
    eng2 = load_engine(cfg.out, EngineConfig(device="cpu", tensor_parallel=cfg.tp, block_size=16, num_blocks=16))
    dist.barrier()
    t_disk = time.perf_counter() - t0

    same = all(torch.equal(a, b) for a, b in zip(eng.model.state_dict().values(), eng2.model.state_dict().values()))
    ok = torch.tensor([int(same)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"[handoff] {n / 1e6:.1f}M parameters fp32, FSDP2 over {world} ranks -> TP {cfg.tp} x "
              f"{world // cfg.tp}: hand-off {t_handoff:.2f} s ({stat['bytes'] / 1e6:.0f} MB into each engine "
              f"rank); export + sharded load {t_disk:.2f} s; equal weights: {bool(ok)}", flush=True)
        shutil.rmtree(cfg.out, ignore_errors=True)
    dist.destroy_process_group()
    sys.exit(0 if bool(ok) else 1)


if __name__ == "__main__":
    main()
