"""RLAIF end to end on a real checkpoint (Lee et al., 2023; PAPER_NOTES section 3): an AI labeller's soft
preferences on pairs of replies, a reward model distilled from them, and RL of the SFT policy against it; or,
with --reward direct, RL against the labeller's own 1-10 score (no reward model).

    python -m selfreward.recipes.rlaif_run --run-dir runs/rlaif --policy SFT_DIR --pairs pairs.jsonl \
        --prompts rl_prompts.jsonl [--labeller DIR] [--reward direct] [--rm-epochs 2 --rl-max-steps 500 ...]
    python -m selfreward.recipes.rlaif_run --config runs/rlaif/config.json --stage rm    # one stage

Stages label -> rm -> rl, the run folder and the manifest: recipes/README.md, "RLAIF end to end". A stage whose
output exists is skipped; a rerun with settings that shape the data is refused (--overwrite starts over).
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.nodes import NodeConfig
from selfreward.infer.config import EngineConfig
from selfreward.recipes import pipeline
from selfreward.recipes.rlaif import LabelConfig, LabelTemplate, position_bias, read_pairs, read_template, soft_labels
from selfreward.recipes.session import Session
from selfreward.ranges import check_fields
from selfreward.records import DataError, nonempty, read_json, read_jsonl, write_json
from selfreward.train.rl import RLConfig, train as train_rl
from selfreward.train.rm import RMConfig, train as train_rm

# fields the recipe sets itself (no flags): each trainer's model, data, folders and seed
SET_HERE = {"rm": {"model", "data", "output", "export", "tokenizer", "resume", "overwrite", "seed"},
            "rl": {"model", "data", "output", "export", "tokenizer", "resume", "overwrite", "seed", "reward",
                   "reward_model", "reward_template"}}


@dataclass
class RLAIFConfig(NodeConfig):   # --nnodes, --node-rank, --rdzv-endpoint: nodes.py
    run_dir: str = ""
    policy: str = cli.checkpoint("")      # the SFT policy: the RM and RL both start from it
    labeller: str = cli.checkpoint("")    # the AI labeller (and --reward direct's scorer); "" = the policy
    pairs: str = cli.input_file("")       # JSONL {"prompt", "response_1", "response_2", "id"?} to label
    prompts: str = cli.input_file("")     # JSONL {"prompt"}: RL's prompts
    reward: str = cli.choice("rm", "direct")   # rm: the distilled RM (RLAIF) | direct: the labeller's score
    cot: bool = False                     # a sampled rationale before each label
    checks: bool = False                  # the rationale: each reply checked alone by the labeller (implies cot)
    cot_max_tokens: int = 128
    label_template: str = cli.input_file("")   # JSON with LabelTemplate fields ("" = the default)
    chunk: int = 64                       # pairs per engine call (the grain of resume)
    nproc: int = cli.passive(1)           # >1: label sharded, the trainers under torchrun
    seed: int = 0
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):   # the door's ranges and choices (ranges.py), for a config built in Python too
        check_fields(self)
        self.check_nodes()


def labeller(cfg: RLAIFConfig) -> str:
    return cfg.labeller or cfg.policy


def stage_label(cfg: RLAIFConfig, t: int, s: Session, rank: int = 0, world: int = 1) -> dict | None:
    out = pipeline.folder(cfg, 0) / "labels.jsonl"
    if cfg.reward != "rm" or out.exists():
        return None
    pairs = nonempty(read_pairs(cfg.pairs), cfg.pairs, "pairs")
    lc = LabelConfig(cot=cfg.cot, checks=cfg.checks, cot_max_tokens=cfg.cot_max_tokens, seed=cfg.seed,
                     template=read_template(LabelTemplate, cfg.label_template or None))

    def work(batch, emit):
        engine, tok = s.get(labeller(cfg))
        res = soft_labels(engine, tok, [(p["prompt"], p["response_1"], p["response_2"]) for _, p in batch], lc,
                          index=[i for i, _ in batch])
        for (i, p), r, n in zip(batch, res["records"], res["prompt_tokens"]):
            emit(i, [dict(p, **r)], n)
    pipeline.units(cfg, rank, world, out, pairs, 1, lambda r: json.dumps(r["id"]), work, "label", "pairs")
    return None


def _train(cfg: RLAIFConfig, name: str, train, tcfg) -> None:
    """RUN/NAME/model by `train` (in process, or under torchrun with --nproc > 1); skipped once exported."""
    home = pipeline.folder(cfg, 0) / name
    if not (home / "model" / "config.json").exists():
        tcfg = dataclasses.replace(tcfg, model=cfg.policy, output=str(home), resume=True, seed=cfg.seed)
        cli.launch(train, tcfg, f"selfreward.train.{name}", cfg.nproc, home.parent / f"{name}_config.json")


def stage_rm(cfg: RLAIFConfig) -> None:
    labels = pipeline.folder(cfg, 0) / "labels.jsonl"
    if cfg.reward == "rm":
        nonempty(read_jsonl(labels, made_by="the label stage"), labels, "labels")
        _train(cfg, "rm", train_rm, dataclasses.replace(cfg.rm, data=[str(labels)]))


def stage_rl(cfg: RLAIFConfig) -> None:
    rm = str(pipeline.folder(cfg, 0) / "rm" / "model") if cfg.reward == "rm" else labeller(cfg)
    _train(cfg, "rl", train_rl, dataclasses.replace(cfg.rl, data=[cfg.prompts], reward=cfg.reward, reward_model=rm))


def write_manifest(cfg: RLAIFConfig, t: int, timings: dict, stats: dict | None = None) -> dict:
    """RUN/manifest.json: the stage timings, the labels' position bias, where the models are, the settings."""
    path = pipeline.folder(cfg, 0) / "manifest.json"
    m = read_json(path)
    labels = pipeline.folder(cfg, 0) / "labels.jsonl"
    if labels.exists():
        recs = read_jsonl(labels, made_by="the label stage")
        m.update(labels=len(recs), position_bias=position_bias(recs))
    m.update(reward=cfg.reward, rm=str(pipeline.folder(cfg, 0) / "rm" / "model") if cfg.reward == "rm" else None,
             policy_out=str(pipeline.folder(cfg, 0) / "rl" / "model"), settings=cli.to_dict(cfg))
    m["timings"] = {**m.get("timings", {}), **timings}
    write_json(path, m)
    return m


def prepare(cfg: RLAIFConfig, s: Session) -> None:
    for flag, v in (("--policy", cfg.policy), ("--prompts", cfg.prompts)) + \
            ((("--pairs", cfg.pairs),) if cfg.reward == "rm" else ()):
        if not v:
            raise cli.ConfigError(f"{flag} is required")
    for flag, d in (("--policy", cfg.policy), ("--labeller", labeller(cfg))):
        if not Path(d).is_dir():
            raise DataError(f"{flag} {d}: not a checkpoint folder")


RECIPE = pipeline.Recipe(
    "selfreward.recipes.rlaif_run", RLAIFConfig, head=(
        pipeline.Stage("label", stage_label, "labels.jsonl", shards=True),
        pipeline.Stage("rm", lambda c, *_: stage_rm(c), trains=True),
        pipeline.Stage("rl", lambda c, *_: stage_rl(c), trains=True)), body=(),
    manifest=write_manifest, prepare=prepare, layout=("labels.jsonl*", "rm", "rl", "manifest.json*", "*_config.json"))


def main(argv: list[str] | None = None):
    return pipeline.main(RECIPE, argv, __doc__, SET_HERE)


if __name__ == "__main__":
    cli.run_main(main)
