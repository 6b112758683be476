"""The optimisation loop both trainers share: global batches, accumulation, clipping, schedule, NaN stop,
metrics JSONL, progress, checkpoints, resume, export (and, with `export_every` N, a Hugging Face export
every N steps to OUTPUT/exports/step_N, atomic, for recipes.select).

A trainer supplies a Task: `num_examples`, `norm(batch)` (the denominator of the global batch's loss:
target tokens for SFT, pairs for DPO), `micro(model, indices)` -> (summed loss with grad, stat sums) and
`summarize(sums, norm)` -> metrics; optionally `evaluate(model)`. Each rank backpropagates
`sum / norm * world`: FSDP averages gradients over ranks, so the update equals the single-process one on
the same global batch whatever the world size and accumulation.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from selfreward.model.checkpoint import load_model
from selfreward.progress import Progress
from selfreward.model.config import ModelConfig
from selfreward.model.tokenizer import Tokenizer
from selfreward.cli import ConfigError, Stopped, run_main
from selfreward.records import DataError, write_atomic
from selfreward.train.checkpointing import drop_checkpoints_from, export_model, latest_checkpoint, \
    load_checkpoint, save_checkpoint
from selfreward.train.config import TrainConfig
from selfreward.train.data import global_batch, rank_micro_batches
from selfreward.train.parallel import Dist, all_reduce_sum, init_distributed, reshard, set_grad_sync


class TrainingStopped(Stopped):
    """A non-finite loss or gradient (or weights): the step was not applied, no checkpoint of those weights
    is kept, and `latest` points at the newest one whose next step was still finite."""


def cli(main) -> None:
    """The entry scripts' `__main__` (selfreward.cli.run_main): a stopped run (NaN/inf loss) prints its
    message and exits 1; bad input, a bad flag, a bad checkpoint or an OS error prints `error: ...`, exit 2;
    Ctrl-C one line `interrupted: ...`, exit 130."""
    run_main(main, interrupted="interrupted: the checkpoints saved so far are kept in --output (every --save-every "
                               "steps and at the end); rerun with --resume to continue")


def start(cfg: TrainConfig) -> tuple[Dist, Tokenizer, str]:
    """The startup both trainers share: threads, process group, tokenizer (-> dist, tokenizer, its folder)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = ModelConfig.from_json(cfg.model).max_position_embeddings
    try:
        d = init_distributed(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.max_length > ctx:
        if d.is_main:
            print(f"[train] --max-length {cfg.max_length} is above the model's context ({ctx} tokens, "
                  f"max_position_embeddings in {cfg.model}/config.json): lowered to {ctx}", flush=True)
        cfg.max_length = ctx
        mpl = getattr(cfg, "max_prompt_length", 0)
        if mpl and mpl >= ctx:
            cfg.max_prompt_length = ctx // 2
            if d.is_main:
                print(f"[train] --max-prompt-length {mpl}: lowered to {ctx // 2} with it", flush=True)
    tok_dir = cfg.tokenizer or cfg.model
    return d, Tokenizer.load(tok_dir), tok_dir


def load_policy(cfg: TrainConfig):
    """The starting checkpoint with the trainer's dropout, single-device (parallelize() comes after)."""
    mcfg = ModelConfig.from_json(cfg.model)
    mcfg.dropout = cfg.dropout
    return load_model(cfg.model, cfg=mcfg)


@torch.no_grad()
def held_out_sums(model, held_out: list, d: Dist, micro: int, sums) -> torch.Tensor:
    """Sum over the held-out set of `sums(model, chunk)` (a tuple of numbers), each rank its every world-th
    example, in eval mode; all-reduced -> float64 [len(tuple)]. Every rank runs the same number of forwards
    (FSDP's collectives need it): a short rank repeats an example and drops its numbers."""
    mine = held_out[d.rank::d.world]
    per_rank = -(-len(held_out) // d.world)
    model.eval()
    tot = None
    for s in range(0, per_rank, micro):
        chunk = mine[s:s + micro]
        vals = torch.tensor([float(v) for v in sums(model, chunk or held_out[:1])], dtype=torch.float64)
        tot = torch.zeros_like(vals) if tot is None else tot
        if chunk:
            tot += vals
    model.train()
    if d.sharded:
        reshard(model)
    return all_reduce_sum(tot, d)


EXPLODED = 1000.0   # weights whose largest |w| grew past this many times the starting one's have blown up


def weight_scale(model, d: Dist) -> float:
    """max |w| over every parameter of every rank (inf when any is not finite)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    m = torch.tensor([max((float(t.detach().abs().max()) for t in local if t.numel()), default=0.0)])
    m = torch.where(torch.isnan(m), torch.tensor([float("inf")]), m)
    if d.world > 1:
        import torch.distributed as dist
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return float(m)


def check_finite(model, d: Dist, out: Path, step: int, name: str, start_scale: float) -> None:
    """Before a checkpoint or export: every weight finite and not blown up (EXPLODED x the starting max
    |w|), else stop: nothing is saved, and no checkpoint those weights came from is kept as good."""
    scale = weight_scale(model, d)
    if not math.isfinite(scale) or scale > EXPLODED * max(start_scale, 1.0):
        good = drop_checkpoints_from(out, step, d)
        raise TrainingStopped(f"[{name}] weights {'not finite' if not math.isfinite(scale) else 'exploded'} "
                              f"after step {step} (max |w| {scale:.3g}, {start_scale:.3g} at the start): not "
                              f"saved; last good checkpoint: {good if good else 'none (nothing good saved)'}")


def check_step_finite(loss: float, gnorm: float, d: Dist, out: Path, step: int, name: str) -> None:
    """Before applying step `step + 1`'s update: a non-finite loss or gradient norm stops training. The
    weights after `step` updates gave it, so a checkpoint of them (step_<step>) is not good either."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        good = drop_checkpoints_from(out, step, d)
        raise TrainingStopped(
            f"[{name}] non-finite loss {loss} / grad norm {gnorm} at step {step + 1}: stopped before applying "
            f"it; last good checkpoint: {good if good else 'none (nothing good saved)'}")


def lr_factor(step: int, total: int, warmup: int, final_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    t = min(1.0, (step - warmup) / span)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return final_ratio + (1 - final_ratio) * shape


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, lines past the restored step are dropped (atomic rewrite)."""

    def __init__(self, path: Path, d: Dist, resume_step: int | None):
        self.path, self.on = path, d.is_main
        if not self.on:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass   # a line cut by the crash
        write_atomic(path, "".join(k + "\n" for k in keep))

    def write(self, rec: dict) -> None:
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def total_steps(cfg: TrainConfig, n: int) -> int:
    """Optimizer steps over `n` examples (--max-steps, else --epochs x whole batches); every trainer refuses
    0 here: the untouched model would be exported as trained."""
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * (n // cfg.batch_size)
    if total < 1:
        raise ConfigError(f"--epochs {cfg.epochs} / --max-steps {cfg.max_steps}: 0 optimizer steps to take")
    return total


def run(cfg: TrainConfig, task, model, d: Dist, tokenizer_dir: str, name: str) -> dict:
    out = Path(cfg.output)
    n = task.num_examples
    if n == 0:
        raise DataError(f"{', '.join(cfg.data)}: no examples left to train on (the files are empty, or every "
                        f"example was dropped: see the counts above; a larger --max-length keeps more)")
    if n < cfg.batch_size:
        # fewer examples than one batch (a late self-rewarding iteration can make few pairs): one smaller
        # batch per epoch, said loudly, rather than zero steps and an unchanged model exported as trained
        # (without --max-steps) or a crash (with it)
        small = n // d.world * d.world
        if small < 1:
            raise DataError(f"[{name}] {n} examples cannot fill one micro-batch on each of {d.world} ranks")
        if d.is_main:
            print(f"[{name}] only {n} examples: batch size lowered from {cfg.batch_size} to {small}", flush=True)
        cfg.batch_size = small
        if cfg.micro_batch_size and small % (cfg.micro_batch_size * d.world):
            cfg.micro_batch_size = small // d.world
    total = total_steps(cfg, n)
    micro = cfg.micro_batch_size or cfg.batch_size // d.world
    if micro < 1 or cfg.batch_size % (micro * d.world):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of micro-batch {micro} x "
                         f"world size {d.world}")
    accum = cfg.batch_size // (micro * d.world)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(0.03 * total)
    # fused AdamW (one kernel per parameter, no temporaries): 0.07 s a step against the per-op loop's 0.30 s
    # (56M parameters, one CPU thread); FSDP2's sharded DTensor parameters keep the per-op loop
    fused = d.world == 1 and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, **({"fused": True} if fused else {"foreach": False}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.final_lr / cfg.lr, cfg.schedule))
    torch.manual_seed(cfg.seed * 1000 + d.rank)
    start_scale = weight_scale(model, d)   # of --model (before any resume): the same for every attempt
    start, ckpt = 0, latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt, sched, d)["step"]
        if d.is_main:
            print(f"[{name}] resumed from {ckpt} at step {start}")
    log = MetricsLog(out / "metrics.jsonl", d, start if ckpt is not None else None)
    if d.is_main:
        print(f"[{name}] {n} examples, {total} steps of {cfg.batch_size} (micro {micro} x accum {accum} x "
              f"world {d.world}), warmup {warmup}, lr {cfg.lr:g} -> {cfg.final_lr:g} ({cfg.schedule})")
    if start == 0 and hasattr(task, "evaluate"):
        log.write({"step": 0, **task.evaluate(model)})
    model.train()
    t_start, tokens_seen, last = time.time(), 0, {}
    # steps between the logged ones: one updating line on a terminal (a line every 10 s in a log)
    prog = Progress(name, total, start, unit="steps", every=10.0) if d.is_main and cfg.log_every > 1 else None
    for step in range(start, total):
        t0, c0 = time.time(), time.process_time()
        batch = global_batch(n, cfg.batch_size, step, cfg.seed, cfg.shuffle)
        norm = task.norm(batch)
        parts = rank_micro_batches(batch, d.world, d.rank, micro)
        sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(parts):
            set_grad_sync(model, i == len(parts) - 1)
            loss_sum, stats = task.micro(model, mb)
            (loss_sum * (d.world / norm)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
        keys = sorted(sums)
        red = all_reduce_sum(torch.stack([torch.as_tensor(sums[k]).to(d.device) for k in keys]), d)
        sums = dict(zip(keys, red.tolist()))
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        metrics = task.summarize(sums, norm)
        check_step_finite(metrics["loss"], gnorm, d, out, step, name)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.sleep_per_step:
            time.sleep(cfg.sleep_per_step)
        dt = time.time() - t0
        tokens_seen += int(sums.get("tokens", 0))
        elapsed = time.time() - t_start
        done = step + 1 - start
        last = {"step": step + 1, **metrics, "lr": lr, "grad_norm": gnorm,
                "tokens_per_s": sums.get("tokens", 0) / dt, "elapsed_s": round(elapsed, 3),
                "cpu_s": round(time.process_time() - c0, 3)}      # this process's CPU time, all threads
        log.write(last)
        if prog is not None:
            prog.update(1, int(sums.get("tokens", 0)))
        if d.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
            eta = elapsed / done * (total - step - 1)
            print(f"[{name}] step {step + 1}/{total} loss {metrics['loss']:.4f} lr {lr:.3g} "
                  f"| {tokens_seen / elapsed:.0f} tok/s | ETA {_fmt_time(eta)}", flush=True)
        evaluate = hasattr(task, "evaluate") and getattr(cfg, "eval_every", 0) and \
            (step + 1) % cfg.eval_every == 0 and step + 1 < total
        if evaluate:
            log.write({"step": step + 1, **task.evaluate(model)})
        export_every = getattr(cfg, "export_every", 0)
        if export_every and (step + 1) % export_every == 0:   # candidates for checkpoint selection
            export_model(model, out / "exports" / f"step_{step + 1}", tokenizer_dir, d)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            check_finite(model, d, out, step + 1, name, start_scale)
            save_checkpoint(out, step + 1, model, opt, sched, {"name": name}, d, cfg.keep_checkpoints)
    if hasattr(task, "evaluate") and start < total:
        ev = task.evaluate(model)
        log.write({"step": total, **ev})
        last.update(ev)
    check_finite(model, d, out, total, name, start_scale)
    if start < total:
        save_checkpoint(out, total, model, opt, sched, {"name": name}, d, cfg.keep_checkpoints)
    export = Path(cfg.export or out / "model")
    if hasattr(task, "export"):      # a task with its own layout (train/rm.py: sequence classification)
        task.export(model, export, d)
    else:
        export_model(model, export, tokenizer_dir, d)
    if d.is_main:
        print(f"[{name}] exported {export}")
    return last
