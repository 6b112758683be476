"""Parallelism applied from outside the single-device model under torchrun: process group, device mesh,
activation checkpointing, FSDP2; one process stays unwrapped (train/README.md, "Parallelism")."""

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from selfreward.cli import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def print(self, *args) -> None:   # rank 0's lines (flushed: torchrun's ranks share the terminal)
        if self.rank == 0:
            print(*args, flush=True)


def train_device(choice: str = "auto", local_rank: int = 0, cuda: bool | None = None) -> torch.device:
    """--device auto (cuda:LOCAL_RANK where CUDA is available, else the CPU), cpu or cuda (insists on CUDA)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {choice!r}: should be auto, cpu or cuda")
    if choice == "cuda" and not cuda:
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    return torch.device("cuda", local_rank) if cuda and choice != "cpu" else torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Process group and device mesh under torchrun; one process otherwise."""
    dev = train_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, mesh)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks, returned on t's device (NCCL reduces tensors on the rank's GPU only)."""
    if d.world > 1:
        x = t.to(d.device)
        dist.all_reduce(x, op=op)
        t = x.to(t.device)
    return t


# what selective checkpointing keeps; the rest of a block is recomputed (train/README.md, "Shared-prompt DPO ...")
_SAVE_OPS = ("mm", "addmm", "bmm", "randint", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    name = getattr(op, "__name__", "").split(".")[0]
    return CheckpointPolicy.MUST_SAVE if name in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_checkpointing(model, selective: bool = False) -> None:
    """Recompute each block in backward (`selective`: all but _SAVE_OPS' outputs). The instance's forward is
    replaced, so parameter names are unchanged; RNG state is replayed, so dropout matches."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    kw = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)} if selective else {}
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **kw)


def apply_fsdp(model, d: Dist, mixed_precision: bool = True) -> None:
    """fully_shard each block, then the root (which keeps its parameters gathered between forward and backward,
    so the losses can use model.lm_head_weight after the forward); bf16 with fp32 reduction on CUDA only."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {"mesh": d.mesh}
    if mixed_precision and d.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by backward: don't free them
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kw)
    fully_shard(model, **kw)


def parallelize(model, d: Dist, activation_checkpointing: bool = False, mixed_precision: bool = True,
                selective: bool = False):
    """Activation checkpointing (whole blocks; else `selective`), then FSDP (or the move to d.device)."""
    if activation_checkpointing or selective:
        apply_checkpointing(model, selective=not activation_checkpointing)
    if d.sharded:
        apply_fsdp(model, d, mixed_precision)   # fully_shard moves the shards to the mesh's device
    else:
        model.to(d.device)
    return model


def reshard(model) -> None:
    """After a no-grad forward under FSDP: free the parameters the root and the last block keep gathered for a
    backward (else model.parameters() would hand the optimizer plain tensors)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def cleanup(d: Dist) -> None:
    """Tear the process group down once the caller has dropped its model (objects still holding gloo work when
    the interpreter finalises after the group is gone abort a successful run: SIGABRT)."""
    if d.world > 1 and dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()
