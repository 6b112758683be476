"""The self-rewarding loop's settings: one nested config (what `RUN/config.json` holds, and what the flags of
`python -m selfreward.recipes.self_reward` set: `--candidates-n`, `--judge-k`, `--dpo-beta`, `--engine-dtype`).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from selfreward import cli
from selfreward.nodes import NodeConfig
from selfreward.ranges import check_fields
from selfreward.infer.config import EngineConfig
from selfreward.recipes.instruct import InstructConfig
from selfreward.recipes.judge import JudgeConfig
from selfreward.recipes.meta_judge import MetaJudgeConfig
from selfreward.recipes.pairs import PAIRINGS
from selfreward.recipes.select import SelectConfig
from selfreward.train import report as dashboards
from selfreward.train.dpo import DPOConfig
from selfreward.train.sft import SFTConfig

# fields the loop sets itself (no flags): DPO's input/output per iteration, the seeds and grain of rounds
REPORT = {"report_to", "run_name", "tensorboard_dir"}   # --report-to, the loop's, for each training stage
LOOP_SET = {"dpo": {"model", "data", "output", "export", "tokenizer", "resume", "overwrite", "seed", "export_every",
                    *REPORT},
            "select": {"candidates", "reference", "out", "report", "engine"},
            "sft": {"model", "output", "export", "tokenizer", "resume", "overwrite", "seed", *REPORT},
            "instruct": {"seed", "batch"}, "judge": {"seed"}, "": {"eval_hook"}}


@dataclass
class CandidatesConfig:
    n: int = 4                        # responses sampled per prompt (paper: 4)
    temperature: float = 0.7
    top_p: float = 0.9
    min_p: float = 0.0                # keep tokens at >= min_p x the top token's probability; 0 = off
    max_tokens: int = 512


@dataclass
class LoopConfig(NodeConfig):   # --nnodes, --node-rank, --rdzv-endpoint: nodes.py
    run_dir: str = ""
    init_model: str = ""              # M1: the checkpoint iteration 1 starts from (or --base-model + --sft-data)
    base_model: str = ""              # M0: with --sft-data (IFT + EFT JSONL), M1 = train/sft.py of it (RUN/m1)
    iterations: int = cli.passive(2)               # 2 = M1 -> M2 -> M3
    # "self-instruct" | a JSONL file of {"id"?, "prompt"} | (Python) fn(t, n, seed) -> [str | {"id", "prompt"}]
    prompt_source: str | Callable = "self-instruct"
    seed_prompts: str = ""            # self-instruct: JSONL with "prompt" (e.g. recipes.oasst's ift.jsonl)
    prompt_model: str = ""            # self-instruct generator; "" = M_t
    n_prompts: int = 1000             # prompts per iteration (from a --prompt-source file: 0 = the whole file)
    score_from: str = cli.choice("sampled", "expected")   # what pairs are built on: the mean of K | expected
    min_margin: float = 0.0           # keep a pair only if best - worst mean score >= this (0: any gap)
    # best-worst: one pair per prompt (the paper); best-rest: the best against each lower-scored distinct text
    pairing: str = cli.choice(*PAIRINGS)
    # an SFT JSONL ({"prompt", "response"}, e.g. the EFT seed) mixed into every iteration's DPO data, each
    # record sft_mix_repeat times, as chosen == rejected records: no DPO gradient, only the NLL term
    # (--dpo-nll-alpha, which must be > 0): an SFT term that keeps what DPO on answers alone lets drift.
    # "" = off (the paper: DPO on the pairs only)
    sft_mix: str = ""
    sft_mix_repeat: int = 1
    # judge self-training: up to this many of M_t's own judgments mixed into the iteration's DPO data as NLL-only
    # records (chosen == rejected, like --sft-mix): the judgments of the texts the pairs use on which all K
    # samples agree, half from chosen texts and half from rejected ones. It keeps the judge on the model's
    # current samples while DPO trains the answers (recipes/self_reward.write_judge_self). 0 = off (the paper)
    judge_self_train: int = 0
    # Meta-Rewarding: M_t also meta-judges its K judgments of each response (pairs of distinct judgments, both
    # orders; --meta-template, --meta-temperature, ...) and the best against the worst judgment of a response
    # joins the iteration's DPO data as a judge pair (recipes/meta_judge.py); off = the paper's loop
    meta_judge: bool = False
    meta: MetaJudgeConfig = field(default_factory=MetaJudgeConfig)
    # Meta-Rewarding's length control of the actor's pairs: the chosen is the shortest text scored within
    # rho x (best - worst) of the best (0 = off: the best-scored); in [0, 1)
    length_control: float = 0.0
    chunk: int = 32                   # units per generate call (the grain of resume)
    nproc: int = cli.passive(1)                    # >1: sampling stages and DPO under torchrun
    # the training stages' dashboards (train/report.py): tensorboard | wandb | mlflow | none, or a comma list;
    # TensorBoard writes RUN/tensorboard/STAGE (sft, iter_1-dpo, ...)
    report_to: str = cli.passive("none")
    seed: int = 0
    # checkpoint selection (paper: an export every 200 DPO steps, the one winning most head-to-heads against
    # M_t on held-out prompts becomes M_{t+1}); 0 = off: the final DPO export is M_{t+1}
    select_every: int = 0
    select: SelectConfig = field(default_factory=SelectConfig)   # --select-prompts (held-out JSONL), ...
    instruct: InstructConfig = field(default_factory=InstructConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)   # M0 -> M1 with --base-model: --sft-data, --sft-lr, ...
    # held-out human-ranked groups (recipes.oasst's groups_eval.jsonl): the judge's Table 4 metrics (K samples
    # each) against the human ranks, on M_1 .. M_{T+1}, in the manifests' "eval"; "" = off
    eval_groups: str = cli.input_file("")
    eval_limit: int = cli.passive(200)             # the first N groups of --eval-groups
    eval_hook: Callable | None = cli.passive(None)  # (Python) fn(t, model_dir) -> dict, on M_t for t = 1..T+1

    def judging(self) -> JudgeConfig:
        """The judge's settings as the loop runs them: --score-from expected also reads the expected score."""
        return dataclasses.replace(self.judge, expected=self.judge.expected or self.score_from == "expected")

    def __post_init__(self):   # the door's ranges (ranges.py), then the loop's own rules
        check_fields(self)
        self.check_nodes()
        dashboards.check(self.report_to)
        if self.candidates.n < 2:
            raise cli.ConfigError("--candidates-n is below its minimum (2: a pair needs two candidates)")
        if self.sft_mix and self.dpo.nll_alpha <= 0:
            raise cli.ConfigError("--sft-mix trains through the NLL term only: it needs --dpo-nll-alpha > 0")
        if not 0.0 <= self.length_control < 1.0:
            raise cli.ConfigError(f"--length-control {self.length_control}: a share of the score range, in [0, 1)")
        if self.judge_self_train and self.dpo.nll_alpha <= 0:
            raise cli.ConfigError("--judge-self-train trains through the NLL term only: it needs --dpo-nll-alpha > 0")
        if self.n_prompts < 0 or (self.n_prompts == 0 and self.prompt_source == "self-instruct"):
            raise cli.ConfigError(f"--n-prompts {self.n_prompts}: must be >= 1 (0 = a whole --prompt-source file)")
        self.engine.check()
        if bool(self.sft.data) != bool(self.base_model) or (self.sft.data and self.init_model):
            raise cli.ConfigError("M1 is --init-model, or SFT of --base-model on --sft-data (give both), not both")
        if self.select_every > 0 and not self.select.prompts:
            raise cli.ConfigError("--select-every needs --select-prompts (held-out prompts, a JSONL with 'prompt')")
        self.select.check_judge_url("--select-")
