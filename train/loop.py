"""The one training loop of the four trainers (train/README.md, "One loop"); each rank backpropagates
`sum / norm * world`, so FSDP's gradient averaging gives the single-process update (README "Parallelism")."""

import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

from selfreward.cli import ConfigError, build, parser, run_main, to_dict
from selfreward.model.checkpoint import export_dtype, load_model
from selfreward.model.config import ModelConfig
from selfreward.model.tokenizer import Tokenizer
from selfreward.progress import Progress
from selfreward.records import DataError, write_atomic
from selfreward.train import heap, report
from selfreward.train.checkpointing import check_finite, claim_run, export_model, latest_checkpoint, \
    load_checkpoint, save_checkpoint, stop, weight_scale
from selfreward.train.config import TrainConfig
from selfreward.train.data import global_batch, rank_micro_batches
from selfreward.train.parallel import Dist, all_reduce, cleanup, init_distributed, parallelize, reshard


def cli(main) -> None:
    """The entry scripts' `__main__` (cli.run_main: a stopped run exits 1, bad input 2, Ctrl-C 130)."""
    run_main(main, interrupted="interrupted: the checkpoints saved so far are kept in --output (every --save-every "
                               "steps and at the end); rerun with --resume to continue")


def entry(cls, name: str, make_task, doc: str):
    """A trainer's `train(cfg, **kw)` (one run, `train` below; `kw` goes to `make_task`, e.g. RL's reward) and
    `main(argv)` (flags or --config -> `cls` -> train)."""
    def run_one(cfg, **kw) -> dict:
        return train(cfg, name, lambda cfg, d, tok: make_task(cfg, d, tok, **kw))
    return run_one, lambda argv=None: run_one(build(cls, parser(cls, doc).parse_args(argv)))


def train(cfg: TrainConfig, name: str, make_task) -> dict:
    """One run (under torchrun, each rank's) -> the last step's metrics; `make_task(cfg, d, tokenizer)` -> a Task."""
    cfg.check()
    with claim_run(cfg):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        d, task = init_distributed(cfg.device), None
        with heap.released(d.device, cfg.release_freed_memory, say=lambda m: d.print(f"[{name}] {m}")):
            try:
                cfg = fit_context(cfg, d)
                tok_dir = cfg.tokenizer or cfg.model
                task = make_task(cfg, d, Tokenizer.load(tok_dir))
                return run(cfg, task, d, tok_dir, name)
            finally:
                del task   # FSDP state, and any collective work it holds, freed while the group is alive
                cleanup(d)


def fit_context(cfg: TrainConfig, d: Dist) -> TrainConfig:
    """--max-length above the model's context -> a copy of `cfg` with it (and --max-prompt-length) lowered."""
    ctx = ModelConfig.from_json(cfg.model).max_position_embeddings
    if cfg.max_length <= ctx:
        return cfg
    mpl = getattr(cfg, "max_prompt_length", 0)
    low = {"max_length": ctx} | ({"max_prompt_length": ctx // 2} if mpl and mpl >= ctx else {})
    d.print(f"[train] --max-length {cfg.max_length} is above the model's context ({ctx} tokens, "
            f"max_position_embeddings in {cfg.model}/config.json): lowered to {ctx}"
            + (f"; --max-prompt-length {mpl}: lowered to {ctx // 2} with it" if len(low) > 1 else ""))
    return dataclasses.replace(cfg, **low)


class Task:
    """What a trainer hands the loop: `model`, `train`, `summarize(sums, norm)`, and `micro(model, indices)` or
    `sums(model, examples)`; the rest is optional (each member: train/README.md, "One loop")."""
    counts: dict = {}                 # returned with the last metrics (the data's truncation counts)
    hf_config: dict | None = None     # config.json fields of the exports (rm: sequence classification)
    show: tuple[str, ...] = ()        # metrics printed on the step line after the loss
    held_out: list = []
    eval_keys: tuple[str, ...] = ()
    eval_norm: str = ""               # the held-out sum (of `sums`) the eval_<key> metrics are divided by

    def norm(self, batch: list[int]) -> float:
        return float(len(batch))

    def micro(self, model, idx: list[int]):
        st = self.sums(model, [self.train[i] for i in idx])
        return st["loss_sum"], st

    def param_groups(self, model) -> list:
        return list(model.parameters())

    def before_step(self, model, step: int, batch: list[int]) -> None:   # rl: weight sync, sampling, rewards
        pass

    def before_export(self, model, step: int) -> None:                   # rl: the last weight sync and probe
        pass


def load_policy(cfg: TrainConfig, d: Dist, load=load_model, prepare=None, **kw):
    """The starting checkpoint with the trainer's dropout, `prepare(model)` (DPO's weights hash, RL's value
    head) while it is whole, then parallelized with the config's checkpointing."""
    mcfg = ModelConfig.from_json(cfg.model)
    mcfg.dropout = cfg.dropout
    model = load(cfg.model, cfg=mcfg, **kw)
    if prepare:
        prepare(model)
    return parallelize(model, d, cfg.activation_checkpointing, cfg.mixed_precision, cfg.selective_checkpointing)


def load_reference(cfg: TrainConfig, d: Dist):
    """The frozen starting checkpoint (eval mode: no dropout), sharded like the policy (DPO online, RL's KL)."""
    return parallelize(load_model(cfg.model).eval().requires_grad_(False), d, False, cfg.mixed_precision)


@torch.no_grad()
def eval_sums(model, items: list, d: Dist, micro: int, sums) -> torch.Tensor:
    """Sum over `items` of `sums(model, chunk)` (a tensor, or a dict of numbers) in eval mode, each rank its every
    world-th item, all-reduced in float64. Every rank runs as many forwards (a short rank repeats an item)."""
    mine, keys, tot = items[d.rank::d.world], None, None
    model.eval()
    for s in range(0, -(-len(items) // d.world), micro):
        chunk = mine[s:s + micro]
        vals = sums(model, chunk or items[:1])
        if isinstance(vals, dict):
            keys, vals = list(vals), [float(v) for v in vals.values()]
        vals = torch.as_tensor(vals, dtype=torch.float64)
        tot = torch.zeros_like(vals) if tot is None else tot
        if chunk:
            tot += vals
    model.train()
    reshard(model)
    tot = all_reduce(tot, d)
    return dict(zip(keys, tot.tolist())) if keys else tot


def cpu_autocast(cfg: TrainConfig, d: Dist):
    """--cpu-bf16 on a CPU rank: the forward's matmuls in bfloat16 (AMX / AVX512-BF16 run them several times
    faster than fp32), the weights, gradients and optimizer in fp32; elsewhere a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16 and d.device.type == "cpu")


def lr_factor(step: int, total: int, warmup: int, final_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    t = min(1.0, (step - warmup) / span)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return final_ratio + (1 - final_ratio) * shape


class MetricsLog:
    """metrics.jsonl on rank 0, each record also sent to `cfg`'s --report-to dashboards (train/report.py); on
    resume, lines past the restored step are dropped (atomic rewrite)."""

    def __init__(self, path: Path, d: Dist, resume_step: int | None, cfg: TrainConfig | None = None):
        self.path, self.on, self.report = path, d.is_main, None
        if self.on:
            old = path.read_text().splitlines() if resume_step is not None and path.exists() else []
            write_atomic(path, "".join(x + "\n" for x in old if _step(x) <= resume_step))
            if cfg is not None and report.parse(cfg.report_to):
                out = Path(cfg.output)
                self.report = report.Reporter(cfg.report_to, cfg.run_name or out.name,
                                              cfg.tensorboard_dir or out / "tensorboard", to_dict(cfg), resume_step)

    def write(self, rec: dict) -> None:
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.report:
                self.report.log(rec)

    def close(self) -> None:
        if self.report:
            self.report.close()


def _step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf   # a line cut by the crash


def run(cfg: TrainConfig, task: Task, d: Dist, tokenizer_dir: str, name: str) -> dict:
    out, model, n = Path(cfg.output), task.model, len(task.train)
    if n == 0:
        raise DataError(f"{', '.join(cfg.data)}: no examples left to train on (the files are empty, or every "
                        f"example was dropped: see the counts above; a larger --max-length keeps more)")
    batch_size, micro = cfg.batch_size, cfg.micro_batch_size
    if n < batch_size:
        # one smaller batch per epoch, said loudly, rather than zero steps (or a crash with --max-steps)
        batch_size = n // d.world * d.world
        if batch_size < 1:
            raise DataError(f"[{name}] {n} examples cannot fill one micro-batch on each of {d.world} ranks")
        d.print(f"[{name}] only {n} examples: batch size lowered from {cfg.batch_size} to {batch_size}")
        if micro and batch_size % (micro * d.world):
            micro = batch_size // d.world
    micro = micro or batch_size // d.world
    if micro < 1 or batch_size % (micro * d.world):
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of micro-batch {micro} x "
                          f"world size {d.world}")
    total = cfg.max_steps or cfg.epochs * (n // batch_size)     # >= 1: TrainConfig.check refuses 0 steps
    accum = batch_size // (micro * d.world)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(0.03 * total)
    fused = d.world == 1 and all(p.device.type in ("cpu", "cuda") for p in model.parameters())   # README "fused AdamW"
    opt = torch.optim.AdamW(task.param_groups(model), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, **({"fused": True} if fused else {"foreach": False}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.final_lr / cfg.lr, cfg.schedule))
    torch.manual_seed(cfg.seed * 1000 + d.rank)
    start_scale = weight_scale(model, d)   # of --model (before any resume): the same for every attempt
    start, ckpt = 0, latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt, sched, d)["step"]
        d.print(f"[{name}] resumed from {ckpt} at step {start}")
    log = MetricsLog(out / "metrics.jsonl", d, start if ckpt is not None else None, cfg)
    d.print(f"[{name}] {n} examples, {total} steps of {batch_size} (micro {micro} x accum {accum} x "
            f"world {d.world}), warmup {warmup}, lr {cfg.lr:g} -> {cfg.final_lr:g} ({cfg.schedule})")

    dtype = export_dtype(cfg.export_dtype, cfg.model)

    def export(path: Path, step: int) -> None:
        check_finite(model, d, out, step, name, start_scale)
        export_model(model, path, tokenizer_dir, d, hf_config=task.hf_config, dtype=dtype)

    def evaluate(step: int) -> dict:
        with cpu_autocast(cfg, d):
            s = eval_sums(model, task.held_out, d, micro, task.sums)
        ev = {f"eval_{k}": v for k, v in task.summarize(s, s[task.eval_norm]).items() if k in task.eval_keys}
        log.write({"step": step, **ev})
        if prog is not None:    # the terminal's progress line gives way to this one
            prog.clear()
        d.print(f"[{name}] step {step}/{total}" + "".join(f" {k} {v:.4f}" for k, v in ev.items()))
        return ev

    # on a terminal, one line updated in place (no line per step); in a log, the step lines every --log-every
    # steps and, between them, a progress line every 10 s
    live = d.is_main and sys.stdout.isatty() and sys.stderr.isatty()
    prog = Progress(name, total, start, unit="steps", every=10.0) if live or d.is_main and cfg.log_every > 1 else None
    if start == 0 and task.held_out:
        evaluate(0)
    t_start, tokens_seen, last = time.time(), 0, {}
    for step in range(start, total):
        t0, c0 = time.time(), time.process_time()
        batch = global_batch(n, batch_size, step, cfg.seed, cfg.shuffle)
        task.before_step(model, step, batch)
        norm = task.norm(batch)
        parts = rank_micro_batches(batch, d.world, d.rank, micro)
        sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(parts):
            if d.sharded:   # the gradient reduce-scatter on the last micro-batch only
                model.set_requires_gradient_sync(i == len(parts) - 1)
            with cpu_autocast(cfg, d):
                loss_sum, stats = task.micro(model, mb)
            (loss_sum * (d.world / norm)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
        keys = sorted(sums)
        red = all_reduce(torch.stack([torch.as_tensor(sums[k]).to(d.device) for k in keys]), d)
        sums = dict(zip(keys, red.tolist()))
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        if not (math.isfinite(sums["loss_sum"]) and math.isfinite(gnorm)):   # the weights after `step` gave it
            stop(f"[{name}] non-finite loss {sums['loss_sum'] / norm} / grad norm {gnorm} at step {step + 1}: "
                 f"stopped before applying it", out, step, d)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics = task.summarize(sums, norm)
        time.sleep(cfg.sleep_per_step)
        dt = time.time() - t0
        tokens_seen += int(sums.get("tokens", 0))
        elapsed = time.time() - t_start
        last = {"step": step + 1, **metrics, "lr": lr, "grad_norm": gnorm,
                "tokens_per_s": sums.get("tokens", 0) / dt, "elapsed_s": round(elapsed, 3),
                "cpu_s": round(time.process_time() - c0, 3)}      # this process's CPU time, all threads
        log.write(last)
        shown = f"loss {metrics['loss']:.4f}{''.join(f' {k} {metrics[k]:.4g}' for k in task.show)} lr {lr:.3g}"
        if prog is not None:
            prog.update(1, int(sums.get("tokens", 0)), shown)
        if d.is_main and not live and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
            eta = elapsed / (step + 1 - start) * (total - step - 1)
            print(f"[{name}] step {step + 1}/{total} {shown} | {tokens_seen / elapsed:.0f} tok/s | "
                  f"ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
        if task.held_out and (step + 1 == total or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            last.update(evaluate(step + 1))
        if getattr(cfg, "export_every", 0) and (step + 1) % cfg.export_every == 0:   # for checkpoint selection
            export(out / "exports" / f"step_{step + 1}", step + 1)
        if step + 1 == total or cfg.save_every and (step + 1) % cfg.save_every == 0:
            check_finite(model, d, out, step + 1, name, start_scale)
            save_checkpoint(out, step + 1, model, opt, sched, {"name": name}, d, cfg.keep_checkpoints)
    task.before_export(model, total)
    export(Path(cfg.export or out / "model"), total)
    log.close()
    d.print(f"[{name}] exported {cfg.export or out / 'model'} ({str(dtype).replace('torch.', '')})")
    return {**last, **task.counts}
