"""Instruction backtranslation (Humpback): a backward model M_yx writes an instruction for each segment of
unlabelled text, the forward model rates the candidate pairs, and the base is fine-tuned on the seed plus
the pairs it rated highly; the new model re-curates, and so on.

    python -m selfreward.recipes.humpback --run-dir runs/hb --base-model BASE --seed-data seed.jsonl \
        --unlabelled web.jsonl more.txt
    python -m selfreward.recipes.humpback --config runs/hb/config.json --stage curate --iter 1   # one stage
    torchrun --nproc_per_node 4 -m selfreward.recipes.humpback --config RUN/config.json --stage augment

Stages (backward, forward, segments, augment; then per iteration curate, select, train), their settings and the
run folder's layout: recipes/README.md, "Instruction backtranslation". A stage whose output exists is skipped; a
killed sampling stage continues from its .partial file.
"""

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.nodes import NodeConfig
from selfreward.ranges import check_fields
from selfreward.infer.config import EngineConfig
from selfreward.recipes import pipeline
from selfreward.recipes.augment import AugmentConfig, stage_augment, stage_segments
from selfreward.recipes.curate import CurateConfig, curation_stats, pair_scores, select
from selfreward.recipes.judge import judge_items
from selfreward.recipes.segment import SegmentConfig
from selfreward.recipes.session import Session
from selfreward.records import DataError, field as rfield, iter_jsonl, read_json, \
    read_jsonl, write_json, write_jsonl
from selfreward.train import report as dashboards
from selfreward.train.layouts import iter_rows
from selfreward.train.sft import SFTConfig

# fields the recipe sets itself (no flags)
SET_HERE = {"sft": {"model", "data", "output", "export", "tokenizer", "resume", "overwrite", "seed", "system_prompt",
                    "eval_data", "report_to", "run_name", "tensorboard_dir"}}


@dataclass
class HumpbackConfig(NodeConfig):   # --nnodes, --node-rank, --rdzv-endpoint: nodes.py
    run_dir: str = ""
    base_model: str = ""              # the base checkpoint: M_yx, M0 and every M_t are fine-tuned from it
    seed_data: str = ""               # JSONL {"prompt", "response"}: the seed (instruction, output) pairs
    extra_seed: list[str] = field(default_factory=list)   # more SFT files for M0 and each M_t (not turned round)
    unlabelled: list[str] = field(default_factory=list)   # JSONL {"text"} or plain-text files
    forward_model: str = ""           # M0, the first curator; "" = SFT of the base on the seed (stage forward)
    iterations: int = cli.passive(2)               # 2 = A(1) -> M1 -> A(2) -> M2
    train_k: float = 5                # M_t trains on A_k(t) with this k (one of --curate-keep; paper's A5: 4.5)
    tags: bool = True                 # a system prompt per source (seed / augmented); --no-tags: none
    seed_tag: str = "Reply the way a helpful AI assistant would."        # "" = no system turn
    augmented_tag: str = "Reply with what a page on the web would say."   # "" = no system turn
    chunk: int = 32                   # units per generate call (the grain of resume)
    nproc: int = cli.passive(1)                    # >1: augment, curate and the SFT runs under torchrun
    # the SFT runs' dashboards (train/report.py): tensorboard | wandb | mlflow | none, or a comma list;
    # TensorBoard writes RUN/tensorboard/STAGE (backward, m0, iter_1, ...)
    report_to: str = cli.passive("none")
    seed: int = 0
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    # the paper's SFT (dropout 0.1 as train/sft.py); batch unset (None): the paper's, per run (paper_batch)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(lr=1e-5, final_lr=9e-6, schedule="linear",
                                                             weight_decay=0.1, batch_size=None))
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):   # the door's ranges (ranges.py), then Humpback's own rules
        check_fields(self)
        self.check_nodes()
        dashboards.check(self.report_to)
        if self.train_k not in self.curate.keep:
            raise cli.ConfigError(f"--train-k {self.train_k} must be one of --curate-keep {self.curate.keep}")
        self.engine.check()


def run_path(cfg: HumpbackConfig, *parts: str) -> Path:
    return Path(cfg.run_dir).joinpath(*parts)


def model_at(cfg: HumpbackConfig, t: int) -> str:
    """M_t: M0 (the forward model) for t = 0, else what iteration t trained."""
    if t == 0:
        return cfg.forward_model or str(run_path(cfg, "m0", "model"))
    return str(run_path(cfg, f"iter_{t}", "model"))


def read_seed(path: str, base: str) -> list[dict]:
    """The seed pairs {"prompt", "response"}, checked (and that there is a base to train them into)."""
    if not base:
        raise cli.ConfigError("--base-model is required (the checkpoint every model is fine-tuned from)")
    if not path:
        raise cli.ConfigError("--seed-data is required (a JSONL of {\"prompt\", \"response\"} seed pairs)")
    out = [{"prompt": rfield(r, "prompt", f"{path}:{i}"), "response": rfield(r, "response", f"{path}:{i}")}
           for i, r in iter_jsonl(path)]
    if not out:
        raise DataError(f"{path}: no seed pairs")
    return out


def backward_records(seed: list[dict]) -> list[dict]:
    """The seed turned around: the output is the user turn, the instruction is the (only) target."""
    return [{"prompt": r["response"], "response": r["prompt"]} for r in seed]


SMALL_SET, SMALL_BATCH, BATCH = 3000, 8, 32   # the paper's fine-tuning batch: 32, 8 for fewer than 3,000 examples


def paper_batch(files: list[str]) -> int:
    """The paper's SFT batch for the examples (rows) of `files`: 32, or 8 when they are fewer than 3,000."""
    rows = itertools.chain.from_iterable(iter_rows(p) for p in files)
    return SMALL_BATCH if sum(1 for _ in itertools.islice(rows, SMALL_SET)) < SMALL_SET else BATCH


def sft_model(cfg: HumpbackConfig, home: Path, seed_files: list[str], aug_files: list[str], seed: int,
              tags: bool = True) -> str:
    """train/sft.py from the base on seed_files + aug_files (each source with its tag) -> home/model; the batch is
    --sft-batch-size where given, else paper_batch's."""
    from selfreward.train.sft import train
    if not (home / "model" / "config.json").exists():
        tags = [f"{p}={cfg.seed_tag}" for p in seed_files if tags and cfg.tags and cfg.seed_tag] + \
            [f"{p}={cfg.augmented_tag}" for p in aug_files if tags and cfg.tags and cfg.augmented_tag]
        batch = cfg.sft.batch_size
        if batch is None:
            batch = paper_batch(seed_files + aug_files)
            print(f"[humpback] {home.name}: SFT batch {batch} (the paper's: {BATCH}, {SMALL_BATCH} below "
                  f"{SMALL_SET:,} examples)", flush=True)
        scfg = dataclasses.replace(cfg.sft, model=cfg.base_model, data=seed_files + aug_files, resume=True, seed=seed,
                                   batch_size=batch,
                                   output=str(home / "sft"), export=str(home / "model"), system_prompt=tags,
                                   **dashboards.for_stage(cfg.report_to, cfg.run_dir, home.name))
        cli.launch(train, scfg, "selfreward.train.sft", cfg.nproc, home / "sft_config.json")
    return str(home / "model")


def stage_backward(cfg: HumpbackConfig) -> None:
    home = run_path(cfg, "backward")
    if not (home / "model" / "config.json").exists():
        data = write_jsonl(home / "data.jsonl", backward_records(read_seed(cfg.seed_data, cfg.base_model)))
        sft_model(cfg, home, [str(data)], [], pipeline.seed(cfg, 0, 0), tags=False)


def stage_forward(cfg: HumpbackConfig) -> None:
    if not cfg.forward_model:
        read_seed(cfg.seed_data, cfg.base_model)
        sft_model(cfg, run_path(cfg, "m0"), [cfg.seed_data, *cfg.extra_seed], [], pipeline.seed(cfg, 0, 1))


def rateable(cfg: HumpbackConfig) -> list[dict]:
    return [c for c in read_jsonl(run_path(cfg, "candidates.jsonl"), made_by="the augment stage") if c["instruction"]]


def stage_curate(cfg: HumpbackConfig, t: int, s: Session, rank: int = 0, world: int = 1) -> None:
    out = run_path(cfg, f"iter_{t}", "ratings.jsonl")
    if out.exists():
        return
    cands = rateable(cfg)
    engine, tok = s.get(model_at(cfg, t - 1))
    jc, base = cfg.curate.judge(), pipeline.seed(cfg, t, 3)

    def work(batch, emit):
        res = judge_items(engine, tok, [(c["instruction"], c["output"]) for _, c in batch], jc,
                          [base + i * jc.k for i, _ in batch])
        for (i, c), r in zip(batch, res):
            emit(i, pipeline.judged(r, {"id": c["id"]}))
    pipeline.units(cfg, rank, world, out, cands, jc.k, lambda r: r["id"], work, f"curate {t}", "pairs")


def stage_select(cfg: HumpbackConfig, t: int) -> dict:
    it = run_path(cfg, f"iter_{t}")
    cands = rateable(cfg)
    ratings = read_jsonl(it / "ratings.jsonl", made_by="the curate stage")
    per_pair = pair_scores(ratings, cfg.curate.score_from)
    kept = {}
    for k in cfg.curate.keep:
        path = it / f"A{k:g}.jsonl"
        if not path.exists():
            write_jsonl(path, select(cands, per_pair, k))
        kept[k] = len(read_jsonl(path))
    return curation_stats(ratings, per_pair, cfg.curate.keep, kept)


def stage_train(cfg: HumpbackConfig, t: int) -> None:
    """M_t on the seed + A_k(t); with A_k(t) empty, on the seed alone (said on stderr and in the manifest)."""
    a = run_path(cfg, f"iter_{t}", f"A{cfg.train_k:g}.jsonl")
    aug = [str(a)] if read_jsonl(a, made_by="the select stage") else []
    if not aug:
        print(f"[humpback] warning: {a} is empty (no pair scored >= {cfg.train_k:g}): M{t} trains on the seed "
              f"alone", file=sys.stderr, flush=True)
    read_seed(cfg.seed_data, cfg.base_model)
    sft_model(cfg, run_path(cfg, f"iter_{t}"), [cfg.seed_data, *cfg.extra_seed], aug, pipeline.seed(cfg, t, 4))


def write_manifest(cfg: HumpbackConfig, t: int, timings: dict, stats: dict | None = None) -> dict:
    """RUN/manifest.json (t = 0: the stages before the iterations) or RUN/iter_t/manifest.json."""
    path = run_path(cfg, "manifest.json") if t == 0 else run_path(cfg, f"iter_{t}", "manifest.json")
    m = read_json(path)
    if t == 0:
        m.update(backward_model=str(run_path(cfg, "backward", "model")), forward_model=model_at(cfg, 0))
        if stats:
            m["segments"] = stats
        cands = run_path(cfg, "candidates.jsonl")
        if cands.exists():
            recs = read_jsonl(cands)
            m["candidates"] = {"pairs": len(recs), "empty_instructions": sum(not r["instruction"] for r in recs),
                               "output_cut": sum(r["output_cut"] for r in recs)}
    else:
        m.update(iteration=t, curator=model_at(cfg, t - 1), model_out=model_at(cfg, t), train_k=cfg.train_k,
                 **(stats or {}))
        if stats:
            m["augmented_pairs_trained"] = stats[f"A{cfg.train_k:g}"]
    m["timings"] = {**m.get("timings", {}), **timings}
    m["settings"] = cli.to_dict(cfg)
    write_json(path, m)
    return m


def report(cfg: HumpbackConfig, t: int, m: dict) -> None:
    print(f"[humpback] iter {t}: {m['pairs_rated']} pairs rated by {m['curator']}, {m['parse_failures']}/"
          f"{m['ratings']} ratings unparsed; " + ", ".join(f"A{k:g} {m[f'A{k:g}']}" for k in cfg.curate.keep)
          + f"; M{t} trained on A{cfg.train_k:g}", flush=True)


RECIPE = pipeline.Recipe(
    "selfreward.recipes.humpback", HumpbackConfig, head=(
        pipeline.Stage("backward", lambda c, *_: stage_backward(c), trains=True),
        pipeline.Stage("forward", lambda c, *_: stage_forward(c), trains=True),
        pipeline.Stage("segments", lambda c, *_: stage_segments(c)),
        pipeline.Stage("augment", lambda c, t, s, rank, world: stage_augment(c, s, rank, world), "candidates.jsonl",
                       shards=True)), body=(
        pipeline.Stage("curate", stage_curate, "ratings.jsonl", shards=True),
        pipeline.Stage("select", lambda c, t, *_: stage_select(c, t)),
        pipeline.Stage("train", lambda c, t, *_: stage_train(c, t), trains=True)),
    manifest=write_manifest, report=report,
    # the run's own layout only: RUN may also hold its input data (humpback_oasst: RUN/data)
    layout=("iter_*", "backward", "m0", "segments.jsonl*", "candidates.jsonl*", "manifest.json*", "config.json*"))


def run_humpback(cfg: HumpbackConfig, s: Session | None = None, overwrite: bool = False) -> list[dict]:
    """All stages, iterations 1..T -> the manifests [RUN, iter_1, ...]. Rerun after a crash to continue."""
    return pipeline.run(RECIPE, cfg, s, overwrite)


def main(argv: list[str] | None = None):
    return pipeline.main(RECIPE, argv, __doc__, SET_HERE)


if __name__ == "__main__":
    cli.run_main(main)
