"""Instruction backtranslation (recipes/humpback.py) in the checkable world, where every backtranslated pair
can be checked: is the answer y right for the instruction x_hat the backward model wrote for it?

    python -m selfreward.recipes.world.demo --method humpback --cache-dir /tmp/world-cache   # runs/world-humpback
    python -m selfreward.recipes.world.demo --method humpback --seed 1 --run-dir runs/world-humpback-s1

The world's parts: the base is the world's M0 (cached; every seed uses the default WorldModelConfig's M0);
the seed is the IFT seed (instruction, right answer) plus the EFT seed (the world's judging in its compact
format): the backward model M_yx trains on the IFT seed turned around, the forward model (seed-only, the
paper's M0) on both, and it curates with the world's judge template (`Score: 5` right, `Score: 1` wrong),
K ratings per pair averaged: A4 = 3 or more of 4 ratings say 5, A5 = all 4 do. The unlabelled text is the
answers of train-split tasks, their instructions hidden; exact duplicates are removed (near-duplicate
removal is off: the world's answers are short symbol strings that differ in one symbol). Seed data has no
system turn (the evaluation prompts have none); augmented data gets the tag "Text from the web.".

Report rows (`summary.json` "rows", each with "model", "iteration" and measure.py's figures):
    seed             the forward model: base + SFT on the seed (iteration 0)
    seed+uncurated   base + SFT on the seed + every candidate pair (iteration 0: augmentation is done once)
    seed+A4, seed+A5 base + SFT on the seed + A_k(t), for iterations t = 1..T (A_k(t) curated by M_{t-1};
                     M_t is the seed+A5 model of iteration t, the curator of iteration t+1)
and `precision_all` (share of all candidate pairs the checker finds right), `precision_a4` / `precision_a5`
and `recall_a4` / `recall_a5` (lists, iteration 1 first: the share of A_k that is right, the share of the
right pairs that are in A_k). Every SFT run takes the same steps, batch and learning rate.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig
from selfreward.recipes.world.build import WorldModelConfig


@dataclass
class WorldHumpbackConfig:
    run_dir: str = cli.passive("runs/world-humpback")
    cache_dir: str = cli.passive("")               # "" = ~/.cache/selfreward/world (the world's M0)
    seed: int = 0
    iterations: int = cli.passive(2)
    nproc: int = cli.passive(1)
    threads: int = cli.passive(0)
    n_ift: int = 300                  # seed pairs (also the backward model's data, turned around)
    n_eft: int = 500                  # seed judging examples (the forward model's rating ability)
    n_unlabelled: int = 1000          # answers of train-split tasks, instructions hidden
    sft_steps: int = 200              # every SFT run (backward, seed, seed + augmented)
    sft_batch: int = 16
    sft_lr: float = 3e-4
    aug_temperature: float = 0.7      # paper: 0.7 / 0.9
    aug_top_p: float = 0.9
    curate_k: int = 4                 # ratings per pair (world scores are 1 or 5: A4 = 3+ of 4 say 5)
    curate_temperature: float = 0.7
    n_eval: int = 200
    n_judge: int = 20                 # measure.py's judge groups (the judge is not what this mode studies)
    # room for backtranslation (recipes/world/README.md, issue 36): the kinds of this run's seeds, unlabelled
    # pool and evaluation ("" = M0's, --m0-kinds; M0 stays the one the --m0- flags name: the shipped M0 read
    # reverse in its first pretraining phase only, and answers it 0.0 of the time)
    kinds: str = ""
    thin_kinds: str = ""              # kinds the seed is thin on: `thin_n_ift` / `thin_n_eft` examples each
    thin_n_ift: int = 0               # (the rest of n_ift / n_eft spread over the other kinds)
    thin_n_eft: int = 0
    pool_kinds: str = ""              # the unlabelled pool's kinds, a repeat weights one ("" = kinds)
    m0: WorldModelConfig = field(default_factory=WorldModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def unlabelled_answers(n: int, seed: int, kinds) -> list[dict]:
    """{"text": answer, "kind"} of n train-split tasks (their instructions are not written; segment.py reads
    only the text)."""
    from selfreward.recipes.world.tasks import sample_tasks
    tasks = sample_tasks(n, seed=50_000 + seed, unique=False, kinds=kinds)
    random.Random(f"unlabelled:{seed}").shuffle(tasks)
    return [{"text": t.answer, "kind": t.kind} for t in tasks]


def world_kinds(cfg: WorldHumpbackConfig) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(the run's kinds, the thin ones, the pool's kinds with repeats), checked."""
    from selfreward.recipes.world.tasks import parse_kinds
    try:
        kinds = tuple(dict.fromkeys(parse_kinds(cfg.kinds or cfg.m0.kinds)))
        thin = parse_kinds(cfg.thin_kinds) if cfg.thin_kinds else ()
        pool = parse_kinds(cfg.pool_kinds) if cfg.pool_kinds else kinds
    except ValueError as e:
        raise cli.ConfigError(f"--kinds / --thin-kinds / --pool-kinds: {e}") from None
    bad = [k for k in (*thin, *pool) if k not in kinds]
    if bad:
        raise cli.ConfigError(f"--thin-kinds / --pool-kinds: {bad[0]} is not one of the run's kinds "
                              f"({','.join(kinds)})")
    if len(thin) >= len(kinds) or cfg.thin_n_ift * len(thin) > cfg.n_ift or cfg.thin_n_eft * len(thin) > cfg.n_eft:
        raise cli.ConfigError(f"--thin-kinds {cfg.thin_kinds}: leaves no other kind, or more thin examples than "
                              "--n-ift / --n-eft")
    return kinds, thin, pool


def write_thin_seeds(run_dir: Path, cfg: WorldHumpbackConfig, kinds, thin) -> None:
    """The IFT and EFT seeds with `thin_n_ift` / `thin_n_eft` examples of each thin kind, the rest of the other kinds;
    without thin kinds, build.write_seeds' seeds of `kinds` (the very files of before)."""
    from selfreward.recipes.world.build import seed_paths, write_seeds
    from selfreward.recipes.world.data import eft_seed, ift_seed
    from selfreward.records import write_jsonl
    if not thin:
        write_seeds(run_dir, cfg.n_ift, cfg.n_eft, cfg.seed, cfg.m0, kinds)
        return
    rich, fmt = tuple(k for k in kinds if k not in thin), cfg.m0.judge_format
    ift = ift_seed(cfg.n_ift - cfg.thin_n_ift * len(thin), cfg.seed, rich)
    eft = eft_seed(cfg.n_eft - cfg.thin_n_eft * len(thin), cfg.seed, rich, fmt)
    for k in thin:
        ift += ift_seed(cfg.thin_n_ift, cfg.seed, (k,))
        eft += eft_seed(cfg.thin_n_eft, cfg.seed, (k,), fmt)
    rng = random.Random(f"thin:{cfg.seed}")
    rng.shuffle(ift)
    rng.shuffle(eft)
    for path, rows in zip(seed_paths(run_dir), (ift, eft)):
        write_jsonl(path, rows)


def precision(cands: list[dict], kept_ids: set[str] | None = None) -> tuple[float | None, float | None]:
    """(share of the kept pairs that are right, share of the right pairs that are kept); all when None."""
    from selfreward.recipes.world.checker import check
    right = {c["id"] for c in cands if check(c["instruction"], c["output"]) == 1.0}
    kept = {c["id"] for c in cands} if kept_ids is None else kept_ids & {c["id"] for c in cands}
    prec = len(kept & right) / len(kept) if kept else None
    return prec, (len(kept & right) / len(right) if right else None)


def humpback_config(cfg: WorldHumpbackConfig, m0: Path, seed_dir: Path, thr: int):
    from selfreward.recipes.curate import CurateConfig
    from selfreward.recipes.humpback import AugmentConfig, HumpbackConfig
    from selfreward.recipes.segment import SegmentConfig
    from selfreward.recipes.world.judging import write_template
    from selfreward.recipes.world.measure import MeasureConfig
    from selfreward.train.sft import SFTConfig
    mc = MeasureConfig()
    sft = SFTConfig(max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr, final_lr=cfg.sft_lr / 10,
                    max_length=128, dropout=0.0, log_every=50, threads=thr)
    return HumpbackConfig(
        run_dir=str(Path(cfg.run_dir) / "hb"), base_model=str(m0), seed_data=str(seed_dir / "ift.jsonl"),
        extra_seed=[str(seed_dir / "eft.jsonl")], unlabelled=[str(seed_dir / "unlabelled.jsonl")],
        iterations=cfg.iterations, train_k=5, seed_tag="", augmented_tag="Text from the web.", nproc=cfg.nproc,
        seed=cfg.seed, segment=SegmentConfig(min_chars=1, max_chars=64, near_dup=0.0),
        augment=AugmentConfig(temperature=cfg.aug_temperature, top_p=cfg.aug_top_p, max_tokens=48),
        curate=CurateConfig(k=cfg.curate_k, temperature=cfg.curate_temperature, max_tokens=mc.judge_max_tokens,
                            template=str(write_template(seed_dir / "judge_template.txt")), keep=[4, 5]),
        sft=sft, engine=cfg.engine)


def run(cfg: WorldHumpbackConfig) -> dict:
    from selfreward.recipes.pipeline import seed as stage_seed
    from selfreward.recipes.humpback import model_at, run_humpback, run_path, sft_model
    from selfreward.recipes.world.build import m0_folder
    from selfreward.recipes.world.demo import Clock
    from selfreward.recipes.world.measure import MeasureConfig, measure
    from selfreward.recipes.world.report import plot_humpback
    from selfreward.records import read_jsonl, write_json, write_jsonl

    kinds, thin, pool = world_kinds(cfg)
    run_dir = Path(cfg.run_dir)
    clock = Clock()
    thr = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if thr:
        import torch
        torch.set_num_threads(thr)
    # the seeds are rewritten and the stages and controls skipped when present: before any of it, a rerun
    # with other settings is refused
    from selfreward.recipes.world.demo import check_run_folder
    check_run_folder(run_dir, cfg, "humpback_settings.json")
    m0 = m0_folder(cfg.m0, Path(cfg.cache_dir or Path.home() / ".cache" / "selfreward" / "world"), False,
                   cfg.nproc, thr)
    seed_dir = run_dir / "seed"
    write_thin_seeds(run_dir, cfg, kinds, thin)
    unlabelled = unlabelled_answers(cfg.n_unlabelled, cfg.seed, pool)
    write_jsonl(seed_dir / "unlabelled.jsonl", unlabelled)
    hc = humpback_config(cfg, m0, seed_dir, thr)
    clock.banner(f"humpback: backward model, seed model, {cfg.n_unlabelled} unlabelled answers, "
                 f"{cfg.iterations} iterations of curation (K={cfg.curate_k}) and SFT")
    t = time.perf_counter()
    manifests = run_humpback(hc)
    clock.stage("humpback", time.perf_counter() - t)

    cands = read_jsonl(run_path(hc, "candidates.jsonl"))
    hb = Path(hc.run_dir)
    models = [("seed", 0, model_at(hc, 0))]
    t = time.perf_counter()
    every = write_jsonl(hb / "candidates_sft.jsonl", [{"prompt": c["instruction"], "response": c["output"]}
                                                      for c in cands if c["instruction"]])
    models.append(("seed+uncurated", 0, sft_model(hc, hb / "uncurated", [hc.seed_data, *hc.extra_seed],
                                                  [str(every)], stage_seed(hc, 0, 5))))
    prec = {"precision_all": precision(cands)[0], "candidates": len(cands)}
    for k in hc.curate.keep:
        prec[f"precision_a{k}"], prec[f"recall_a{k}"], prec[f"size_a{k}"] = [], [], []
    for it in range(1, cfg.iterations + 1):
        for k in hc.curate.keep:
            a = run_path(hc, f"iter_{it}", f"A{k}.jsonl")
            p, r = precision(cands, {x["id"] for x in read_jsonl(a)})
            prec[f"precision_a{k}"].append(p)
            prec[f"recall_a{k}"].append(r)
            prec[f"size_a{k}"].append(len(read_jsonl(a)))
            path = model_at(hc, it) if k == hc.train_k else sft_model(
                hc, hb / "controls" / f"iter_{it}_A{k}", [hc.seed_data, *hc.extra_seed], [str(a)],
                stage_seed(hc, it, 10 + k))
            models.append((f"seed+A{k}", it, path))
    prec["by_kind"] = by_kind(cands, unlabelled, hc, cfg.iterations)
    clock.stage("control_sft", time.perf_counter() - t)
    mcfg = MeasureConfig(n_eval=cfg.n_eval, n_judge=cfg.n_judge, kinds=kinds, seed=cfg.seed)
    rows = []
    for name, it, path in models:
        t = time.perf_counter()
        r = measure(path, mcfg, cfg.engine)
        clock.stage("measure", time.perf_counter() - t)
        rows.append({"model": name, "iteration": it, **{k: v for k, v in r.items() if k != "examples"}})
        print(f"[world-humpback] {name} (iteration {it}): greedy acc {r['greedy_acc']:.3f}", flush=True)
    print("\n" + table(rows, prec), flush=True)
    png = plot_humpback(rows, prec, run_dir / "curves.png")
    wall = time.perf_counter() - clock.t0
    summary = {**prec, "rows": rows, "wall_seconds": round(wall, 1), "stage_seconds": clock.stages,
               "config": cli.to_dict(cfg), "m0": str(m0), "plot": str(png) if png else None,
               "manifests": manifests}
    path = write_json(run_dir / "summary.json", summary)
    print(f"\n[world-humpback] wall time {wall:.0f}s; summary: {path}" + (f"; plot: {png}" if png else ""), flush=True)
    return summary


def by_kind(cands: list[dict], unlabelled: list[dict], hc, iterations: int) -> dict:
    """The precision figures per kind of the output's hidden task ("max/min" for an answer both made):
    candidates, right, precision and, per iteration, |A_k|, precision and recall."""
    from selfreward.recipes.humpback import run_path
    from selfreward.records import read_jsonl
    made = {}
    for u in unlabelled:
        made.setdefault(u["text"], set()).add(u["kind"])
    groups = {}
    for c in cands:
        groups.setdefault("/".join(sorted(made.get(c["output"], {"?"}))), []).append(c)
    out = {}
    for name, cs in sorted(groups.items()):
        p, _ = precision(cs)
        d = out[name] = {"candidates": len(cs), "right": round(p * len(cs)), "precision_all": p}
        for k in hc.curate.keep:
            d[f"size_a{k}"], d[f"precision_a{k}"], d[f"recall_a{k}"] = [], [], []
            for it in range(1, iterations + 1):
                kept = {x["id"] for x in read_jsonl(run_path(hc, f"iter_{it}", f"A{k}.jsonl"))}
                pk, rk = precision(cs, kept)
                d[f"size_a{k}"].append(len(kept & {c["id"] for c in cs}))
                d[f"precision_a{k}"].append(pk)
                d[f"recall_a{k}"].append(rk)
    return out


def paired_se(a: str, b: str) -> float:
    """The standard error of the mean paired difference of two models' per-prompt results (measure.py's
    "greedy_correct" strings on the same prompts)."""
    from selfreward.recipes.metrics import paired_diff
    return paired_diff(a, b)[1]


def table(rows: list[dict], prec: dict) -> str:
    kinds = sorted(rows[0]["acc_by_kind"])
    lines = [f"{'model':>16}  {'iter':>4}  {'acc greedy':>10}  {'SE':>5}  {'acc T':>6}  "
             + "  ".join(f"{k:>7}" for k in kinds),
             f"{'-' * 16}  {'-' * 4}  {'-' * 10}  {'-' * 5}  {'-' * 6}  " + "  ".join("-" * 7 for _ in kinds)]
    lines += [f"{r['model']:>16}  {r['iteration']:>4}  {r['greedy_acc']:>10.3f}  {r['greedy_acc_se']:>5.3f}  "
              f"{r['sampled_acc']:>6.3f}  " + "  ".join(f"{r['acc_by_kind'][k]:>7.3f}" for k in kinds) for r in rows]
    base = {r["model"]: r for r in rows if r["iteration"] == 0}
    for r in rows:
        if r["model"] == "seed+A5":
            lines.append(f"seed+A5 iteration {r['iteration']} minus " + "; ".join(
                f"{b}: {r['greedy_acc'] - base[b]['greedy_acc']:+.3f} (paired SE "
                f"{paired_se(r['greedy_correct'], base[b]['greedy_correct']):.3f})" for b in base))
    f = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    lines.append(f"\ncandidate pairs {prec['candidates']}: precision {f(prec['precision_all'])}")
    for i in range(len(prec.get("precision_a4", []))):
        lines.append(f"iteration {i + 1}: " + "; ".join(
            f"A{k} {prec[f'size_a{k}'][i]} pairs, precision {f(prec[f'precision_a{k}'][i])}, "
            f"recall {f(prec[f'recall_a{k}'][i])}" for k in (4, 5)))
    for name, d in prec.get("by_kind", {}).items():
        lines.append(f"  {name}: {d['right']} of {d['candidates']} right ({f(d['precision_all'])}); " + "; ".join(
            f"iteration {i + 1} " + ", ".join(f"A{k} {d[f'size_a{k}'][i]} precision {f(d[f'precision_a{k}'][i])} "
                                              f"recall {f(d[f'recall_a{k}'][i])}" for k in (4, 5))
            for i in range(len(d["size_a4"]))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return run(cli.parse_config(WorldHumpbackConfig, argv, __doc__.split("\n")[0]))
