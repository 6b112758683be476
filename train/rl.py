"""Online RL of a policy against an AI reward (RLAIF, PAPER_NOTES section 3): REINFORCE with a learned
value baseline, or RLOO, plus a per-token KL penalty to the frozen SFT policy.

    python train/rl.py --model M1 --data prompts.jsonl --output runs/rl --reward rm --reward-model runs/rm/model
    torchrun --nproc_per_node 8 train/rl.py --model M1 --data prompts.jsonl --output runs/rl --reward direct
    python train/rl.py ... --estimator rloo --num-samples 4

Each step: the engine gets the trainer's current weights (no disk: train/rollout.py), samples responses
for --batch-size prompts (each rank its share) at --temperature, the reward scores them (rm: the distilled
RM; direct: a labeller's 1-10 score, default labeller --model; judge; checker: the world), and the policy
takes one update (train/rl_losses.py). Prompts: {"prompt": "..."} JSONL, one user turn each.
Writes OUTPUT/metrics.jsonl, OUTPUT/checkpoints/ (--resume is exact), OUTPUT/probes.jsonl (greedy replies
to --probe-data every --probe-every steps, from the trainer's own engine) and the HF export OUTPUT/model/.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfreward.cli import passive
from selfreward.infer.config import EngineConfig
from selfreward.records import DataError, field as rec_field
from selfreward.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from selfreward.train.config import ConfigError, TrainConfig, parse_config
from selfreward.train.data import global_batch, read_jsonl
from selfreward.train.loop import MetricsLog, check_finite, check_step_finite, cli, load_policy, lr_factor, start, \
    total_steps, weight_scale
from selfreward.train.parallel import Dist, all_reduce_sum, cleanup, parallelize, reshard, set_grad_sync
from selfreward.train.rl_losses import ESTIMATORS, reinforce_loss, rloo_loss, seq_sums
from selfreward.train.rollout import VALUE_HEAD, entropy_sum, flat_batch, prompt_ids, response_logps, sample
from selfreward.train.rollout import sync_weights
from selfreward.train.runfolder import claim_run

STATS = ("loss", "pg", "value_sq", "reward", "reward_sq", "kl", "entropy", "resp_tokens", "responses",
         "train_tokens", "sample_tokens", "truncated")


@dataclass
class RLConfig(TrainConfig):
    lr: float = 1e-5                  # RLAIF paper: lr 1e-5, batch 128, beta 0.05, temperature 0.9
    final_lr: float = 1e-6
    batch_size: int = 128             # GLOBAL prompts per step (each rank batch / world)
    micro_batch_size: int = 0         # prompts per forward per rank (with their samples); 0 = all of the rank's
    dropout: float = 0.0              # the update's log-probs must be the sampler's: no dropout by default
    reward: str = "rm"                # rm | direct | judge | checker (recipes/reward.py)
    reward_model: str = ""            # RM folder (rm) or labeller (direct, judge; default --model, the SFT policy)
    reward_template: str = ""         # direct: ScoreTemplate JSON; judge: rubric file or built-in name
    estimator: str = "reinforce"      # reinforce (value baseline) | rloo (leave-one-out over --num-samples)
    num_samples: int = 1              # responses per prompt (rloo: >= 2)
    beta: float = 0.05                # per-token KL penalty to the frozen SFT policy (--model)
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 64         # per response; --max-length bounds prompt + response (lowered to the context)
    value_lr: float = 1e-3            # the value head's lr (a linear head on the policy's detached hidden states)
    value_coef: float = 1.0
    probe_data: str = ""              # prompts JSONL: greedy replies every --probe-every steps -> probes.jsonl
    probe_every: int = 0
    export_every: int = passive(0)             # HF export every N steps to OUTPUT/exports/step_N
    engine: EngineConfig = field(default_factory=EngineConfig)   # the sampler (--engine-device, ...)

    def check(self) -> None:
        super().check()
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"--estimator {self.estimator!r}: choose {' or '.join(ESTIMATORS)}")
        from selfreward.recipes.reward import KINDS      # the reward's own list (rl's one seam into recipes/)
        if self.reward not in KINDS:
            raise ConfigError(f"--reward {self.reward!r}: choose one of {', '.join(KINDS)}")
        if self.reward == "rm" and not self.reward_model:
            raise ConfigError("--reward rm needs --reward-model (the folder train/rm.py wrote)")
        if self.estimator == "rloo" and self.num_samples < 2:
            raise ConfigError("--estimator rloo needs --num-samples >= 2")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0 (the update is on the sampling distribution)")
        if self.engine.tensor_parallel != 1:
            raise ConfigError("--engine-tensor-parallel: the RL sampler is one full replica per rank (1)")


def load_prompts(paths: list[str], tok, room: int) -> list[str]:
    out = []
    for path in paths:
        for where, rec in read_jsonl(path):
            text = rec_field(rec, "prompt", where)
            if len(prompt_ids(tok, text)) > room:
                raise DataError(f"{where}: field 'prompt' has more than {room} tokens (context - max_new_tokens)")
            out.append(text)
    return out


def build_reward(cfg: RLConfig, device: str, dtype):
    """The one upward import in train/: the reward interface of the recipes (part 1), built lazily."""
    from selfreward.recipes.reward import load_reward
    path = cfg.reward_model or (cfg.model if cfg.reward in ("direct", "judge") else None)
    return load_reward(cfg.reward, path, cfg.reward_template or None, device=device, dtype=dtype)


def build_engine(cfg: RLConfig, tok):
    from selfreward.infer.config import resolve_device
    from selfreward.infer.engine import Engine
    from selfreward.model.checkpoint import load_model
    e = cfg.engine
    device, dtype = resolve_device(e)
    return Engine(load_model(cfg.model, dtype=dtype, device=device), tok, block_size=e.block_size,
                  num_blocks=e.num_blocks or None, max_num_seqs=e.max_num_seqs,
                  max_num_batched_tokens=e.max_num_batched_tokens, prefix_cache=e.prefix_cache)


def export_policy(model, out: Path, tokenizer_dir: str, d: Dist) -> None:
    """The policy without its value head, gathered on rank 0, as a Hugging Face folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from selfreward.model.checkpoint import save_model
    from selfreward.train.parallel import barrier
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_model({k: v for k, v in sd.items() if not k.startswith(VALUE_HEAD)}, model.cfg, out, tokenizer_dir)
    barrier(d)


class Prober:
    """Greedy replies to fixed prompts from the trainer's engine (rank 0) -> probes.jsonl {step, texts, ids,
    logprobs (of each greedy token)}."""

    def __init__(self, cfg: RLConfig, tok, d: Dist, resume_step: int | None):
        self.every, self.on = cfg.probe_every, bool(cfg.probe_data and cfg.probe_every and d.is_main)
        self.prompts = [prompt_ids(tok, rec_field(r, "prompt", w)) for w, r in read_jsonl(cfg.probe_data)] \
            if self.on else []
        self.max_tokens = cfg.max_new_tokens
        self.log = MetricsLog(Path(cfg.output) / "probes.jsonl", d, None if resume_step is None else
                              resume_step - 1) if self.on else None

    def __call__(self, engine, step: int, last: bool = False) -> float:
        if not self.on or not (step % self.every == 0 or last):
            return 0.0
        from selfreward.infer.sequence import SamplingParams
        t0 = time.perf_counter()
        outs = engine.generate(self.prompts, SamplingParams(temperature=0.0, max_tokens=self.max_tokens, logprobs=True))
        self.log.write({"step": step, "texts": [o[0].text for o in outs], "ids": [o[0].token_ids for o in outs],
                        "logprobs": [o[0].logprobs for o in outs]})
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(RLConfig, argv, __doc__))


def train(cfg: RLConfig, reward=None) -> dict:
    """One RL run (in this process; under torchrun each rank calls it) -> the last step's metrics. `reward`:
    a function (prompts, responses) -> rewards; default built from --reward (recipes.reward.load_reward).
    The run folder is claimed first, as the other trainers' (train/runfolder.py)."""
    cfg.check()
    with claim_run(cfg, "rl"):
        return _train(cfg, reward)


def _train(cfg: RLConfig, reward) -> dict:
    d, tok, tok_dir = start(cfg)
    from selfreward.model.checkpoint import load_model
    from selfreward.model.config import ModelConfig
    room = min(cfg.max_length, ModelConfig.from_json(cfg.model).max_position_embeddings) - cfg.max_new_tokens
    prompts = load_prompts(cfg.data, tok, room)
    if cfg.batch_size % d.world or len(prompts) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the world size {d.world} and at "
                          f"most the {len(prompts)} prompts")
    per_rank = cfg.batch_size // d.world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"--micro-batch-size {micro} must divide the {per_rank} prompts per rank")
    total = total_steps(cfg, len(prompts))   # before any model loads, as the other trainers refuse it
    model = load_policy(cfg)
    model.value_head = torch.nn.Linear(model.cfg.hidden_size, 1)     # V(state) from the detached hidden state
    for p in model.value_head.parameters():                           # zero: the baseline starts at 0
        torch.nn.init.zeros_(p)
    parallelize(model, d, cfg.activation_checkpointing, cfg.mixed_precision)
    ref = load_model(cfg.model).eval().requires_grad_(False)       # the frozen SFT policy
    parallelize(ref, d, False, cfg.mixed_precision)
    engine = build_engine(cfg, tok)
    dev = engine.runner.device
    source = "given" if reward is not None else cfg.reward
    reward = reward or build_reward(cfg, str(dev), engine.runner.dtype)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(0.03 * total)
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not n.startswith(VALUE_HEAD)]},
                             {"params": [p for n, p in named if n.startswith(VALUE_HEAD)], "lr": cfg.value_lr}],
                            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.final_lr / cfg.lr, cfg.schedule))
    torch.manual_seed(cfg.seed * 1000 + d.rank)
    start_scale = weight_scale(model, d)   # of --model: weights past EXPLODED x this are never saved
    out, step0 = Path(cfg.output), 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step0 = load_checkpoint(ckpt, model, opt, sched, d)["step"]
        if d.is_main:
            print(f"[rl] resumed from {ckpt} at step {step0}")
    log = MetricsLog(out / "metrics.jsonl", d, step0 if ckpt is not None else None)
    probe = Prober(cfg, tok, d, step0 if ckpt is not None else None)
    loss_fn = reinforce_loss if cfg.estimator == "reinforce" else rloo_loss
    if d.is_main:
        print(f"[rl] {len(prompts)} prompts, {total} steps of {cfg.batch_size} prompts x {cfg.num_samples} "
              f"samples ({cfg.estimator}, beta {cfg.beta}, T {cfg.temperature}, reward {source}), world {d.world}")
    model.train()
    last, t_start = {}, time.time()
    try:
        for step in range(step0, total):
            t0 = time.perf_counter()
            sync_s = sync_weights(engine, model)
            probe_s = probe(engine, step)
            batch = global_batch(len(prompts), cfg.batch_size, step, cfg.seed, cfg.shuffle)
            first = d.rank * per_rank
            mine = [prompts[i] for i in batch[first:first + per_rank]]
            seeds = [((cfg.seed * 1_000_003 + step) * 1_000_033 + first + k) * cfg.num_samples for k in range(per_rank)]
            rolls, sample_s = sample(engine, tok, mine, cfg.num_samples, cfg.temperature, cfg.top_p,
                                     cfg.max_new_tokens, seeds)
            t = time.perf_counter()
            for r, v in zip(rolls, reward([r.prompt for r in rolls], [r.text for r in rolls])):
                r.reward = float(v)
            reward_s, t = time.perf_counter() - t, time.perf_counter()
            norm = cfg.batch_size * cfg.num_samples
            sums = torch.zeros(len(STATS), dtype=torch.float64)
            for i in range(0, per_rank, micro):
                set_grad_sync(model, i + micro >= per_rank)
                b = flat_batch([r for r in rolls if i <= r.group < i + micro], d.device)   # the trainer's device
                logp, h = response_logps(model, b, cfg.temperature)               # [M], [M, H]
                with torch.no_grad():
                    ref_lp, _ = response_logps(ref, b, cfg.temperature)            # [M]
                if d.sharded:
                    reshard(ref)
                values = model.value_head(h.detach()).squeeze(-1)                 # [M]
                o = loss_fn(logp, values, ref_lp, b.seq, b.rewards, b.group, cfg.beta, cfg.value_coef)
                ent = entropy_sum(model, h, cfg.temperature)        # before backward reshards the LM head
                (o.loss * (d.world / norm)).backward()
                kl = seq_sums(logp.detach() - ref_lp, b.seq, len(b.rewards))
                sums += torch.tensor([o.loss.item(), o.pg.item(), 2 * o.value.item(), b.rewards.sum().item(),
                                      (b.rewards ** 2).sum().item(), kl.sum().item(), ent, len(b.seq), len(b.rewards),
                                      len(b.tokens), len(b.seq), 0.0], dtype=torch.float64)
            sums[STATS.index("truncated")] = sum(r.finish == "length" for r in rolls)
            s = dict(zip(STATS, all_reduce_sum(sums, d).tolist()))
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            check_step_finite(s["loss"] / norm, gnorm, d, out, step, "rl")
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            train_s = time.perf_counter() - t
            if cfg.sleep_per_step:
                time.sleep(cfg.sleep_per_step)
            step_s = time.perf_counter() - t0 - probe_s
            n, m = s["responses"], max(1.0, s["resp_tokens"])
            mean = s["reward"] / n
            last = {"step": step + 1, "loss": s["loss"] / norm, "pg_loss": s["pg"] / norm,
                    "reward_mean": mean, "reward_std": math.sqrt(max(0.0, s["reward_sq"] / n - mean ** 2)),
                    "kl": s["kl"] / n, "kl_per_token": s["kl"] / m, "value_loss": 0.5 * s["value_sq"] / m,
                    "entropy": s["entropy"] / m, "response_len": s["resp_tokens"] / n,
                    "truncated": s["truncated"] / n, "lr": lr, "grad_norm": gnorm,
                    "sample_tokens_per_s": s["sample_tokens"] / max(sample_s, 1e-9),
                    "train_tokens_per_s": s["train_tokens"] / max(train_s, 1e-9),
                    "sync_s": sync_s, "sync_share": sync_s / step_s, "sample_s": sample_s, "reward_s": reward_s,
                    "train_s": train_s, "step_s": step_s, "elapsed_s": round(time.time() - t_start, 3)}
            log.write(last)
            if d.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                print(f"[rl] step {step + 1}/{total} reward {mean:.4f} kl {last['kl']:.4f} len "
                      f"{last['response_len']:.1f} | sync {sync_s * 1e3:.1f} ms ({100 * last['sync_share']:.1f}%) "
                      f"| {last['sample_tokens_per_s']:.0f} sampled tok/s", flush=True)
            if cfg.export_every and (step + 1) % cfg.export_every == 0:
                check_finite(model, d, out, step + 1, "rl", start_scale)
                export_policy(model, out / "exports" / f"step_{step + 1}", tok_dir, d)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                check_finite(model, d, out, step + 1, "rl", start_scale)
                save_checkpoint(out, step + 1, model, opt, sched, {"name": "rl"}, d, cfg.keep_checkpoints)
        check_finite(model, d, out, total, "rl", start_scale)
        if step0 < total:
            save_checkpoint(out, total, model, opt, sched, {"name": "rl"}, d, cfg.keep_checkpoints)
        sync_weights(engine, model)
        probe(engine, total, last=True)
        export = Path(cfg.export or out / "model")
        export_policy(model, export, tok_dir, d)
        if d.is_main:
            print(f"[rl] exported {export}")
        return last
    finally:
        del model, ref, opt, engine, reward   # FSDP state freed while the process group is alive
        cleanup(d)


if __name__ == "__main__":
    cli(main)
