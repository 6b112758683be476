"""Tensor parallelism applied from outside the model, DP x TP groups, the FSDP2 -> TP hand-off (infer/README.md)."""

import os
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer
from selfreward.records import DataError
from selfreward.units import Work, dist_env, run_units


@dataclass
class TPGroup:
    rank: int = 0             # position in the group
    size: int = 1
    group: object = None      # torch.distributed ProcessGroup (None when size 1)
    replica: int = 0          # which group (data-parallel replica) this rank belongs to
    num_replicas: int = 1
    leaders: object = None    # the process group of every replica's first rank (None when size 1)


_GROUPS: dict[int, TPGroup] = {}


def init_tp(tp: int) -> TPGroup:
    """WORLD_SIZE ranks -> WORLD_SIZE / tp replicas of consecutive ranks (0..tp-1, tp..2tp-1, ...), made once per
    degree; call on every rank after init_process_group and, on CUDA, set_device (stage_group does both)."""
    if tp in _GROUPS:
        return _GROUPS[tp]
    up = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if up else dist_env()
    if world % tp:
        raise DataError(f"--tensor-parallel {tp} does not divide WORLD_SIZE {world}")
    if tp == 1:
        return TPGroup(replica=rank, num_replicas=world)
    if not up:
        raise DataError(f"--tensor-parallel {tp} needs torchrun (a process group of WORLD_SIZE ranks)")
    groups = [dist.new_group(list(range(r * tp, (r + 1) * tp))) for r in range(world // tp)]   # every rank makes all
    leaders = dist.new_group(list(range(0, world, tp)))
    _GROUPS[tp] = TPGroup(rank % tp, tp, groups[rank // tp], rank // tp, world // tp, leaders)
    return _GROUPS[tp]


@contextmanager
def stage_group(device: str, world: int):
    """The process group of a sharded run under torchrun (world > 1), gloo or NCCL (cuda:LOCAL_RANK), destroyed on
    the way out; one the caller made itself (tests/tp_worker.py) is used and left as it is."""
    if world <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")   # the shards' barrier, the TP collectives
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_stage_units(tensor_parallel: int, chunk: int, rank: int, world: int, out: Path, units: Sequence[dict],
                    per_unit: int, key: Callable[[dict], Hashable], work: Work, progress: str = "",
                    unit: str = "units") -> bool:
    """run_units over the ranks, or (tensor_parallel > 1) over DP x TP replicas -> True on the rank that wrote OUT."""
    if tensor_parallel == 1:
        return run_units(out, units, per_unit, key, work, chunk, rank, world, progress, unit)
    tp = init_tp(tensor_parallel)
    leader = tp.replica * tp.size    # the leader's global rank

    def share(msg):
        box = [msg]
        dist.broadcast_object_list(box, src=leader, group=tp.group)
        return box[0]

    if tp.rank == 0:
        def lead(batch, emit):
            share(batch)
            work(batch, emit)
        try:
            wrote = run_units(out, units, per_unit, key, lead, chunk, rank=tp.replica, world=tp.num_replicas,
                              progress=progress, unit=unit, group=tp.leaders if tp.num_replicas > 1 else None)
        finally:
            share(None)              # the followers stop (also when the leader failed: no rank hangs)
    else:
        wrote, err = False, None
        while (batch := share(None)) is not None:
            if err is None:
                try:
                    work(batch, lambda *emitted: None)
                except Exception as e:   # the leader fails alike (same inputs): wait for its stop message
                    err = e
        if err is not None:
            raise err
    dist.barrier()                   # the merged OUT exists before any rank goes on
    return wrote


# -- the shard plan: which slice of each full tensor rank r holds ----------------------------------
def local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """-> (query heads, KV heads) per rank; a layout `tp` cannot split is a DataError (`error: ...`, exit 2)."""
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if nh % tp:
        raise DataError(f"num_attention_heads {nh} is not divisible by tensor parallel {tp}")
    if nkv >= tp and nkv % tp:
        raise DataError(f"num_key_value_heads {nkv} is not divisible by tensor parallel {tp}")
    if nkv < tp and tp % nkv:
        raise DataError(f"tensor parallel {tp} is not a multiple of num_key_value_heads {nkv}")
    if cfg.intermediate_size % tp:
        raise DataError(f"intermediate_size {cfg.intermediate_size} is not divisible by tensor parallel {tp}")
    return nh // tp, max(1, nkv // tp)


def vocab_range(cfg: ModelConfig, rank: int, tp: int) -> tuple[int, int, int]:
    """-> (first id, end id, rows per rank): rank r owns ids [lo, hi), padded to `rows`."""
    rows = -(-cfg.vocab_size // tp)
    lo = min(rank * rows, cfg.vocab_size)
    return lo, min(lo + rows, cfg.vocab_size), rows


def shard_plan(cfg: ModelConfig, rank: int, tp: int) -> dict[str, tuple[int, int, int]]:
    """Our parameter name -> (dim, start, stop) of the full tensor; names not listed are replicated."""
    hd, nkv = cfg.head_dim, cfg.num_key_value_heads
    qh, kvh = local_heads(cfg, tp)
    kv0 = rank * kvh if nkv >= tp else rank // (tp // nkv)   # first KV head of this rank
    q = (0, rank * qh * hd, (rank + 1) * qh * hd)
    kv = (0, kv0 * hd, (kv0 + kvh) * hd)
    inter = cfg.intermediate_size // tp
    up, down = (0, rank * inter, (rank + 1) * inter), (1, rank * inter, (rank + 1) * inter)
    lo, hi, _ = vocab_range(cfg, rank, tp)
    plan = {"tok_embeddings.weight": (0, lo, hi)}
    if not cfg.tie_word_embeddings:
        plan["output.weight"] = (0, lo, hi)
    for i in range(cfg.num_hidden_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        plan.update({a + "wq.weight": q, a + "wk.weight": kv, a + "wv.weight": kv, a + "wo.weight": (1,) + q[1:],
                     f + "w1.weight": up, f + "w3.weight": up, f + "w2.weight": down})
        if cfg.attention_bias:
            plan.update({a + "wq.bias": q, a + "wk.bias": kv, a + "wv.bias": kv})
    return plan


def take(full: torch.Tensor, name: str, plan: dict, rows: int) -> torch.Tensor:
    """This rank's part of full tensor `name` (all of it when not in `plan`); vocab shards zero-padded to `rows`."""
    if name in plan:
        dim, a, b = plan[name]
        full = full.narrow(dim, a, b - a)
    if name in ("tok_embeddings.weight", "output.weight") and full.shape[0] < rows:
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return full


# -- applying it to a model --------------------------------------------------------------------------
def _embed(self, ids, lo: int, hi: int, group):                       # ids [N] -> [N, H]
    inside = (ids >= lo) & (ids < hi)
    x = F.embedding(torch.where(inside, ids - lo, 0), self.weight) * inside[:, None].to(self.weight.dtype)
    dist.all_reduce(x, group=group)       # exactly one rank holds each id: the sum is that row, unrounded
    return x


def _logits(self, h: torch.Tensor) -> torch.Tensor:                   # [N, H] -> [N, V] fp32 on every rank
    local = (h @ self.lm_head_weight.T).float().contiguous()          # [N, rows]
    parts = [torch.empty_like(local) for _ in range(self.tp.size)]
    dist.all_gather(parts, local, group=self.tp.group)
    return torch.cat(parts, -1)[:, :self.cfg.vocab_size]


def _score_logprobs(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:   # [n, H], [n] -> [n]
    lo, hi, rows = vocab_range(self.cfg, self.tp.rank, self.tp.size)
    local = (h @ self.lm_head_weight.T).float()                       # [n, rows]
    local[:, hi - lo:] = float("-inf")                                # padding rows are no tokens
    m = local.max(-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.tp.group)
    inside = (targets >= lo) & (targets < hi)
    t = local.gather(1, torch.where(inside, targets - lo, 0)[:, None])[:, 0]
    both = torch.stack([(local - m[:, None]).exp().sum(-1), torch.where(inside, t, 0.0)])   # [2, n]
    dist.all_reduce(both, group=self.tp.group)
    return both[1] - m - both[0].log()


def tp_model(cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype = torch.float32, device="cpu",
             path: str | Path | None = None) -> Transformer:
    """Rank tp.rank's shard (tp.size > 1): the sliced parameters, the local head counts, the collectives as forward
    hooks; its weights read from checkpoint `path` (this rank's slices only), else uninitialised (for a hand-off)."""
    plan, (qh, kvh) = shard_plan(cfg, tp.rank, tp.size), local_heads(cfg, tp.size)
    lo, hi, rows = vocab_range(cfg, tp.rank, tp.size)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        for name, p in list(model.named_parameters()):
            if name in plan:
                mod, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(mod), attr, nn.Parameter(take(p.data, name, plan, rows).clone(),
                                                                      requires_grad=False))
    for layer in model.layers:
        layer.attention.nh, layer.attention.nkv = qh, kvh
        for row_parallel in (layer.attention.wo, layer.feed_forward.w2):   # partial sums, reduced in place
            row_parallel.register_forward_hook(lambda _mod, _inp, out: dist.all_reduce(out, group=tp.group))
    emb = model.tok_embeddings
    emb.forward = types.MethodType(lambda self, ids: _embed(self, ids, lo, hi, tp.group), emb)
    model.logits = types.MethodType(_logits, model)
    model.score_logprobs = types.MethodType(_score_logprobs, model)
    model.tp = tp
    model = model.to_empty(device=device)
    model.inv_freq = cfg.inv_freq().to(device=device, dtype=dtype)   # as model.checkpoint.load_model casts it
    if path is not None:
        from selfreward.model.checkpoint import read_state
        state, model.loaded_bytes = read_state(path, Transformer(cfg, device="meta"), dtype, plan=plan)
        model.load_state_dict({k: take(v, k, {}, rows) for k, v in state.items()}, strict=True)  # vocab padded
    return model.eval()


# -- FSDP2 trainer -> TP engine, without a disk round trip (infer/README.md, "FSDP2 -> TP weight hand-off") ---
@torch.no_grad()
def copy_weights(model: Transformer, src: nn.Module, skip: tuple[str, ...] = ()) -> dict:
    """Engine.load_weights: fill `model` (this rank's shard, or a whole model) from `src` (DTensors or plain),
    one full parameter at a time; names starting with one of `skip` left out; -> {seconds, bytes}."""
    t0 = time.perf_counter()
    tp = getattr(model, "tp", TPGroup())
    plan = shard_plan(model.cfg, tp.rank, tp.size) if tp.size > 1 else {}
    rows = vocab_range(model.cfg, tp.rank, tp.size)[2]
    dst = dict(model.named_parameters())
    moved, written = 0, set()
    for name, p in src.named_parameters():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        if skip and name.startswith(skip):
            continue
        if name not in dst:
            raise KeyError(f"weight hand-off: the engine has no parameter {name!r}")
        written.add(name)
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        part = take(full, name, plan, rows)
        dst[name].copy_(part)
        moved += part.numel() * dst[name].element_size()
        del full, part
    if written != set(dst):
        raise KeyError(f"weight hand-off: engine parameters not written: {sorted(set(dst) - written)[:4]}")
    return {"seconds": time.perf_counter() - t0, "bytes": moved}
