"""Online RL of a policy against an AI reward (RLAIF): REINFORCE with a learned value baseline, or RLOO, plus a
per-token KL penalty to the frozen SFT policy (train/README.md, "Online RL").

    python train/rl.py --model M1 --data prompts.jsonl --output runs/rl --reward rm --reward-model runs/rm/model
    torchrun --nproc_per_node 8 train/rl.py --model M1 --data prompts.jsonl --output runs/rl --reward direct
    python train/rl.py ... --estimator rloo --num-samples 4
    python train/rl.py ... --value-model M1                  # the paper's separate value model, from SFT
    python train/rl.py ... --reward mypkg.rewards:length_penalty      # any reward factory (REWARDS below)
"""

import importlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfreward.cli import ConfigError, checkpoint, choice, passive
from selfreward.model.checkpoint import load_model
from selfreward.model.config import ModelConfig
from selfreward.records import DataError
from selfreward.train import loop
from selfreward.train.config import TrainConfig
from selfreward.train.layouts import prompt_text, read_rows
from selfreward.train.loop import MetricsLog, cli, load_policy, load_reference
from selfreward.train.parallel import reshard
from selfreward.train.losses import reinforce_loss, rloo_loss, seq_sums
from selfreward.train.rollout import VALUE_HEAD, EngineConfig, entropy_sum, flat_batch, greedy, load_engine, \
    response_hidden, response_logps, sample, sync_weights

# --reward NAME: a name here or any `module:function`: a reward factory (README "Rewards"); train/ imports no recipes/
REWARDS = {"rm": "selfreward.model.reward_model:RMReward",           # the distilled reward model (train/rm.py)
           "direct": "selfreward.recipes.reward:direct",             # a labeller's 1-10 score, in [-1, 1]
           "judge": "selfreward.recipes.reward:judge",               # the self-rewarding judge, in [-1, 1]
           "checker": "selfreward.recipes.world.checker:reward",     # the checkable world: 1 right, 0 wrong
           "ifeval": "selfreward.recipes.verifiable:reward",         # IFEval's checkers: 1 all followed, else 0
           "ifeval-partial": "selfreward.recipes.verifiable:partial_reward"}   # the share of them followed


def reward_factory(name: str, load: bool = True):
    """The factory --reward NAME names (load=False: only the check that it names one)."""
    module, sep, fn = REWARDS.get(name, name).partition(":")
    if not (sep and module and fn):
        raise ConfigError(f"--reward {name!r}: choose one of {', '.join(REWARDS)}, or give module:function")
    try:
        return getattr(importlib.import_module(module), fn) if load else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--reward {name!r}: cannot import {module}:{fn} ({e})") from None


@dataclass
class RLConfig(TrainConfig):
    lr: float = 1e-5                  # RLAIF paper: lr 1e-5, batch 128, beta 0.05, T 0.9, 8 epochs (--epochs 8)
    batch_size: int = 128             # GLOBAL prompts per step (each rank batch / world)
    micro_batch_size: int = 0         # prompts per forward per rank (with their samples); 0 = all of the rank's
    dropout: float = 0.0              # the update's log-probs must be the sampler's: no dropout by default
    activation_checkpointing: bool = passive(True)   # 2.4 GB less at the same time on SmolLM2 (train/README.md)
    reward: str = "rm"                # rm | direct | judge | checker | ifeval[-partial] | module:function (REWARDS)
    reward_model: str = checkpoint("")            # RM folder (rm) or labeller (direct, judge; default --model, the SFT policy)
    reward_template: str = ""         # direct: ScoreTemplate JSON; judge: a rubric file or name; ifeval: records JSONL
    estimator: str = choice("reinforce", "rloo")   # reinforce: a value baseline; rloo: leave-one-out over --num-samples
    num_samples: int = 1              # responses per prompt (rloo: >= 2)
    beta: float = 0.05                # per-token KL penalty to the frozen SFT policy (--model)
    reward_weight: str = choice("1", "1-beta")   # r - beta KL, or the paper's (1 - beta) r - beta KL
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 64         # per response; --max-length bounds prompt + response (lowered to the context)
    value_model: str = checkpoint("")   # a critic of its own from this HF folder (the paper's: the SFT model); "" = a
    #                                     linear head on the policy's detached hidden states
    value_lr: float = 1e-3            # the value head's lr (the whole critic's with --value-model)
    value_coef: float = 1.0
    probe_data: str = ""              # prompts JSONL: greedy replies every --probe-every steps -> probes.jsonl
    probe_every: int = 0
    export_every: int = passive(0)             # HF export every N steps to OUTPUT/exports/step_N
    engine: EngineConfig = field(default_factory=EngineConfig)   # the sampler (--engine-device, ...)

    def check(self) -> None:
        super().check()
        reward_factory(self.reward, load=False)
        if self.reward == "rm" and not self.reward_model:
            raise ConfigError("--reward rm needs --reward-model (the folder train/rm.py wrote)")
        if self.reward.startswith("ifeval") and not self.reward_template:
            raise ConfigError(f"--reward {self.reward} needs --reward-template (the records JSONL recipes/verifiable.py wrote)")
        if self.estimator == "rloo" and self.num_samples < 2:
            raise ConfigError("--estimator rloo needs --num-samples >= 2")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0 (the update is on the sampling distribution)")
        if self.engine.tensor_parallel != 1:
            raise ConfigError("--engine-tensor-parallel: the RL sampler is one full replica per rank (1)")
        if self.engine.backend != "ours" or self.engine.url:
            raise ConfigError("--engine-backend/--engine-url: the RL sampler is ours (the policy's weights are "
                              "handed to it in memory after every step)")


def zero_linear(hidden: int) -> torch.nn.Linear:
    """A scalar linear head, zero, so the baseline starts at 0."""
    head = torch.nn.Linear(hidden, 1)
    for p in head.parameters():
        torch.nn.init.zeros_(p)
    return head


def add_value_head(model, critic=None) -> None:
    """V(state): `model.value_head`, a linear head on the policy's detached hidden state, or a ValueModel
    around `critic` (--value-model). Under VALUE_HEAD's name either way: never exported nor handed to the engine."""
    model.value_head = zero_linear(model.cfg.hidden_size) if critic is None else ValueModel(critic)


class ValueModel(torch.nn.Module):
    """--value-model: a critic of its own (the paper's value model, initialised from the SFT model), a linear head
    on its own last hidden state; the value loss alone trains it, the policy's states are not used."""

    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, zero_linear(body.cfg.hidden_size)

    def forward(self, b) -> torch.Tensor:                 # [M]: V before each response token of the batch
        return self.head(response_hidden(self.body, b)[0]).squeeze(-1)


def load_critic(cfg: RLConfig):
    """--value-model's transformer (the trainer's dropout), or None; it reads the policy's token ids."""
    if not cfg.value_model:
        return None
    try:
        mcfg, vocab = ModelConfig.from_json(cfg.value_model), ModelConfig.from_json(cfg.model).vocab_size
    except ConfigError as e:
        raise ConfigError(f"--value-model: {e}") from None
    if mcfg.vocab_size != vocab:
        raise ConfigError(f"--value-model {cfg.value_model}: a vocabulary of {mcfg.vocab_size} tokens, the "
                          f"policy's has {vocab} (the critic reads the policy's token ids)")
    mcfg.dropout = cfg.dropout
    return load_model(cfg.value_model, cfg=mcfg)


class RLTask(loop.Task):
    """The prompts, the policy with its value head, the frozen SFT policy, the sampler and the reward."""
    show = ("reward_mean", "kl", "response_len", "sync_s")

    def __init__(self, cfg: RLConfig, d, tok, reward=None):
        self.cfg, self.d, self.tok, self.train = cfg, d, tok, []
        room = cfg.max_length - cfg.max_new_tokens
        for path in cfg.data:
            for where, rec in read_rows(path):
                self.train.append(prompt_text(rec, where))
                if len(tok.user_ids(self.train[-1])) > room:
                    raise DataError(f"{where}: field 'prompt' has more than {room} tokens "
                                    f"(context - max_new_tokens)")
        critic = load_critic(cfg)
        self.model = load_policy(cfg, d, prepare=lambda m: add_value_head(m, critic))
        self.ref = load_reference(cfg, d)                                  # the frozen SFT policy
        self.engine = load_engine(cfg.model, cfg.engine)
        self.reward = reward or reward_factory(cfg.reward)(
            cfg.reward_model or cfg.model, template=cfg.reward_template or None,
            device=str(self.engine.runner.device), dtype=self.engine.runner.dtype)
        self.loss_fn = reinforce_loss if cfg.estimator == "reinforce" else rloo_loss
        self.probes = None
        d.print(f"[rl] {len(self.train)} prompts x {cfg.num_samples} samples ({cfg.estimator}, beta {cfg.beta}, "
                f"T {cfg.temperature}, reward {'given' if reward is not None else cfg.reward})")

    def param_groups(self, model) -> list[dict]:
        named = list(model.named_parameters())
        return [{"params": [p for n, p in named if not n.startswith(VALUE_HEAD)]},
                {"params": [p for n, p in named if n.startswith(VALUE_HEAD)], "lr": self.cfg.value_lr}]

    def before_step(self, model, step: int, batch: list[int]) -> None:
        c, self.t0 = self.cfg, time.perf_counter()
        self.sync_s = sync_weights(self.engine, model)
        self.probe_s = self.probe(step)
        per = len(batch) // self.d.world
        first = self.d.rank * per
        mine = batch[first:first + per]
        self.group = {i: k for k, i in enumerate(mine)}       # prompt -> its place in this rank's share
        # each request's seed is a function of (seed, step, place in the batch): not of the world size or a resume
        seeds = [((c.seed * 1_000_003 + step) * 1_000_033 + first + k) * c.num_samples for k in range(per)]
        self.rolls, self.sample_s = sample(self.engine, self.tok, [self.train[i] for i in mine], c.num_samples,
                                           c.temperature, c.top_p, c.max_new_tokens, seeds)
        t = time.perf_counter()
        for r, v in zip(self.rolls, self.reward([r.prompt for r in self.rolls], [r.text for r in self.rolls])):
            r.reward = float(v)
        self.t_train = time.perf_counter()
        self.reward_s = self.t_train - t

    def norm(self, batch: list[int]) -> float:
        return float(len(batch) * self.cfg.num_samples)

    def micro(self, model, idx: list[int]):
        c, places = self.cfg, {self.group[i] for i in idx}
        rolls = [r for r in self.rolls if r.group in places]
        b = flat_batch(rolls, self.d.device)                                     # the trainer's device
        logp, h = response_logps(model, b, c.temperature)                        # [M], [M, H]
        with torch.no_grad():
            ref_lp, _ = response_logps(self.ref, b, c.temperature)              # [M]
        reshard(self.ref)
        values = model.value_head(b) if c.value_model else model.value_head(h.detach()).squeeze(-1)   # [M]
        w = 1 - c.beta if c.reward_weight == "1-beta" else 1.0
        o = self.loss_fn(logp, values, ref_lp, b.seq, w * b.rewards, b.group, c.beta, c.value_coef)
        ent = entropy_sum(model, h, c.temperature)               # before backward reshards the LM head
        kl = seq_sums(logp.detach() - ref_lp, b.seq, len(b.rewards))
        n = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
        return o.loss, {"loss_sum": o.loss, "pg": o.pg, "value": o.value, "reward": b.rewards.sum(),
                        "reward_sq": (b.rewards ** 2).sum(), "kl": kl.sum(), "entropy": n(ent),
                        "resp_tokens": n(len(b.seq)), "responses": n(len(b.rewards)), "tokens": n(len(b.tokens)),
                        "truncated": n(sum(r.finish == "length" for r in rolls))}

    def summarize(self, s: dict, norm: float) -> dict:
        now = time.perf_counter()
        n, m = s["responses"], max(1.0, s["resp_tokens"])
        mean = s["reward"] / n
        train_s, step_s = now - self.t_train, now - self.t0 - self.probe_s
        return {"loss": s["loss_sum"] / norm, "pg_loss": s["pg"] / norm, "reward_mean": mean,
                "reward_std": math.sqrt(max(0.0, s["reward_sq"] / n - mean ** 2)), "kl": s["kl"] / n,
                "kl_per_token": s["kl"] / m, "value_loss": s["value"] / m, "entropy": s["entropy"] / m,
                "response_len": s["resp_tokens"] / n, "truncated": s["truncated"] / n,
                "sample_tokens_per_s": s["resp_tokens"] / max(self.sample_s, 1e-9),
                "train_tokens_per_s": s["tokens"] / max(train_s, 1e-9), "sync_s": self.sync_s,
                "sync_share": self.sync_s / step_s, "sample_s": self.sample_s, "reward_s": self.reward_s,
                "train_s": train_s, "step_s": step_s}

    def before_export(self, model, step: int) -> None:
        sync_weights(self.engine, model)
        self.probe(step, last=True)

    def probe(self, step: int, last: bool = False) -> float:
        """Rank 0's engine, right after a sync: greedy replies to --probe-data -> probes.jsonl {step, texts, ids,
        logprobs (of each greedy token)}, every --probe-every steps and after the last -> seconds."""
        c = self.cfg
        if not (c.probe_data and c.probe_every and self.d.is_main):
            return 0.0
        if self.probes is None:          # the first call is at the run's first step (after a resume: the restored one)
            self.probe_ids = [self.tok.user_ids(prompt_text(r, w)) for w, r in read_rows(c.probe_data)]
            self.probes = MetricsLog(Path(c.output) / "probes.jsonl", self.d, step - 1 if step else None)
        if step % c.probe_every and not last:
            return 0.0
        t0 = time.perf_counter()
        outs = greedy(self.engine, self.probe_ids, c.max_new_tokens)
        self.probes.write({"step": step, "texts": [o.text for o in outs], "ids": [o.token_ids for o in outs],
                           "logprobs": [o.logprobs for o in outs]})
        return time.perf_counter() - t0


train, main = loop.entry(RLConfig, "rl", RLTask, __doc__)   # train(cfg, reward=fn): any (prompts, responses) -> [float]

if __name__ == "__main__":
    cli(main)
