"""The embedded default: the whole self-rewarding loop on the checkable world, on a CPU, in minutes.

    python -m selfreward.recipes.world.demo                          # the default run (runs/world)
    python -m selfreward.recipes.world.demo --seed 1 --run-dir runs/world-s1
    python -m selfreward.recipes.world.demo --scale 2 --iterations 3 # bigger: more web text, steps, prompts
    python -m selfreward.recipes.world.demo --smoke                  # every stage at tiny sizes from the shipped M0

Stages: M0 (the shipped one, recipes/world/m0/, when its key matches the settings; else built and cached) ->
seeds (IFT, EFT in the world's judge format) -> M1 = train/sft.py on the
seeds -> recipes.self_reward (prompts, N candidates, K self-judgments, pairs, train/dpo.py) -> M2 -> M3.
After each model the checker measures held-out accuracy and the judge's agreement (recipes/world/measure.py);
per iteration the report sets the self-judge's ranking of the model's own right and wrong samples against the
model's likelihood; the controls run the same iterations from M1 with the checker's preferences (the oracle:
what DPO on the model's own candidates can reach) and with M1 judging every iteration (a judge that does
not improve; recipes/world/controls.py). The figures go to a terminal table, RUN/summary.json and
RUN/curves.png (row names: recipes/world/rows.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig
from selfreward.recipes.world.build import WorldModelConfig, m0_folder, run_sft, seed_paths, write_seeds
from selfreward.recipes.world.measure import MeasureConfig, measure


@dataclass
class DemoConfig:
    run_dir: str = cli.passive("runs/world")
    cache_dir: str = cli.passive("")               # "" = ~/.cache/selfreward/world
    # the task kinds of the seeds, the loop and the evaluation: a subset of M0's pretraining kinds (--m0-kinds),
    # "" = all of them. min: M0 answers max of eight and sort of eight digits right 0.89 / 0.997 of the time
    # (no room), min of eight 0.59 with pass@8 0.81 (recipes/world/README.md)
    kinds: str = "min"
    seed: int = 0                     # the loop's seed (seeds, SFT, sampling, DPO, evaluation); M0 is --m0-seed
    iterations: int = cli.passive(2)
    nproc: int = cli.passive(1)                    # ranks for train/sft.py, train/dpo.py and the sampling stages (torchrun)
    threads: int = cli.passive(0)
    # seeds and M1
    n_ift: int = 300
    n_eft: int = 500
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 3e-4
    # each iteration
    n_prompts: int = 3000
    n_candidates: int = 8
    temperature: float = 1.0          # the paper's 0.7 left 32 of 300 prompts with two distinct candidates
    top_p: float = 0.9
    judge_k: int = 3
    judge_temperature: float = 0.7
    min_margin: float = 0.0           # recipes.self_reward --min-margin: drop pairs whose score gap is smaller
    # best-rest: each prompt's best text against each lower-scored one; best-worst: one pair (the paper's).
    # With 3,000 prompts the checker's pairs lifted M1 +0.15 (best-rest) vs +0.05 (best-worst) at these DPO
    # settings (recipes/world/README.md, "The oracle gate")
    pairing: str = "best-rest"
    # the EFT seed mixed into each iteration's DPO data this many times as NLL-only records (recipes.self_reward
    # --sft-mix): DPO on answers alone lets the judge drift (held-out pairwise 0.92 -> 0.37); 0 = off (paper)
    eft_mix: int = 1
    # judge self-training (recipes.self_reward --judge-self-train): up to this many of M_t's own unanimous
    # judgments of the texts it paired, as NLL-only records in the iteration's DPO; 0 = off (the paper)
    judge_self_train: int = 0
    # share of the EFT seed's wrong candidates that are close misses (data.close_miss: for min a number 1-3
    # from the answer, the wrong answer M1 samples most, which the judge had marked equal to the answer);
    # 0 = the near-miss / one-edit mix alone (recipes/world/README.md, fifth session)
    eft_close: float = 0.5
    # Meta-Rewarding (issue 35; recipes/world/meta.py): M_t also meta-judges its judgments and trains on judge
    # pairs beside the answer pairs (recipes.self_reward --meta-judge); M1's SFT data gains n_meta meta-judge
    # examples (checking the checks), also mixed into DPO with the EFT seed. Off: the paper's loop
    meta_judge: bool = False
    n_meta: int = 500
    length_control: float = 0.0       # recipes.self_reward --length-control (Meta-Rewarding's rho)
    dpo_lr: float = 2e-4
    dpo_beta: float = 0.1
    dpo_nll_alpha: float = 3.0        # train/dpo.py --nll-alpha: + alpha * chosen NLL per token (RPO)
    dpo_epochs: int = 3
    dpo_batch: int = 16
    # the controls (recipes/world/controls.py), the same iterations from M1 ("none": no control): "oracle" (the checker's
    # preferences; rows M2-oracle, M3-oracle) and "fixed" (M1 judges every iteration; row M3-fixed)
    controls: list[str] = cli.passive(["oracle", "fixed"])
    # evaluation: greedy on n_eval held-out prompts; pass@N (N = n_candidates) on the first n_pass of them
    n_eval: int = 1000
    n_pass: int = 100
    n_judge: int = 50
    # M0: the shipped one (recipes/world/m0/) when its key matches these settings; True: build (cached)
    rebuild_m0: bool = cli.passive(False)
    m0: WorldModelConfig = field(default_factory=WorldModelConfig)   # --m0-hidden, --m0-kinds, ...
    engine: EngineConfig = field(default_factory=EngineConfig)       # --engine-device, --engine-dtype, ...

    def scaled(self, s: float) -> "DemoConfig":
        """Sizes times s (steps, data, prompts); the model's shape is set by its own flags."""
        m = dataclasses.replace(self.m0, web_docs=int(self.m0.web_docs * s),
                                pretrain_steps=int(self.m0.pretrain_steps * s))
        return dataclasses.replace(self, m0=m, n_ift=int(self.n_ift * s), n_eft=int(self.n_eft * s),
                                   sft_steps=int(self.sft_steps * s), n_prompts=int(self.n_prompts * s))


# a tiny M0 that builds in seconds: what tests/test_world_smoke.py pretrains to cover tokenizer + M0 pretraining
SMOKE_M0 = WorldModelConfig(hidden=32, layers=2, heads=2, ffn=64, web_docs=2000, web_p_judge=0.5, base_steps=60,
                            base_lr=1e-2, pretrain_steps=60, pretrain_batch=16, pretrain_lr=1e-2)


def smoke_config(run_dir: str, cache_dir: str) -> DemoConfig:
    """Every stage after M0 at tiny sizes, from the shipped M0 (no build: ~15 s on a laptop core; what
    tests/test_world_smoke.py runs and what checks an install)."""
    return DemoConfig(run_dir=run_dir, cache_dir=cache_dir, n_ift=24, n_eft=48, sft_steps=10, sft_batch=8,
                      n_prompts=12, n_candidates=3, judge_k=2, judge_temperature=1.0, temperature=1.0,
                      dpo_epochs=1, dpo_batch=4, n_eval=10, n_pass=6, n_judge=5, judge_self_train=8)


def loop_kinds(cfg: DemoConfig) -> tuple[str, ...]:
    """The kinds the seeds, the loop and the evaluation use: `--kinds`, a subset of M0's (`--m0-kinds`)."""
    from selfreward.recipes.world.tasks import parse_kinds
    for flag, kinds in (("--m0-kinds", cfg.m0.kinds), ("--m0-base-kinds", cfg.m0.base_kinds), ("--kinds", cfg.kinds)):
        try:
            kinds and parse_kinds(kinds)
        except ValueError as e:
            raise cli.ConfigError(f"{flag} {kinds}: {e}") from None
    ks = parse_kinds(cfg.kinds) if cfg.kinds else cfg.m0.kind_tuple()
    extra = [k for k in ks if k not in cfg.m0.kind_tuple()]
    if extra:
        raise cli.ConfigError(f"--kinds {','.join(ks)}: {extra[0]} is not one of M0's kinds ({cfg.m0.kinds})")
    return ks


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 2)

    def banner(self, text: str) -> None:
        print(f"\n[world {time.perf_counter() - self.t0:7.1f}s] {text}", flush=True)


def check_run_folder(run_dir: Path, cfg, name: str = "demo_settings.json") -> None:
    """RUN_DIR/NAME records the run's settings (a DemoConfig, or another mode's config); a rerun whose settings
    differ is refused (provenance.check_settings: DataError, exit 2): it would reuse seeds, M1 or iterations
    made otherwise. The fields marked cli.PASSIVE (where things go, CPUs, extending the run) may change."""
    from selfreward.provenance import check_settings
    from selfreward.records import DataError, read_json, write_json
    path = run_dir / name
    now = json.loads(json.dumps(cli.to_dict(cfg)))                    # tuples -> lists, as read back
    try:
        old = read_json(path)
    except ValueError as e:
        raise DataError(f"{path}: unreadable ({e}); remove it or use another --run-dir") from None
    check_settings(path, type(cfg), old, now, flag=None)
    write_json(path, now)


def run(cfg: DemoConfig) -> dict:
    from selfreward.recipes.self_reward import LoopConfig, run_loop
    from selfreward.recipes.world.data import loop_prompts
    from selfreward.recipes.world.judging import check_format, write_template
    from selfreward.recipes.world.controls import run_control
    from selfreward.recipes.world.report import plot, table
    from selfreward.recipes.world.rows import iteration_stats, paired
    from selfreward.records import read_jsonl, write_json, write_jsonl

    from selfreward.recipes.world.controls import CONTROLS
    bad = [c for c in cfg.controls if c not in CONTROLS + ("none",)]
    if bad:
        raise cli.ConfigError(f"--controls {bad[0]!r}: choose from {', '.join(CONTROLS)}, or none")
    cfg = dataclasses.replace(cfg, controls=[c for c in cfg.controls if c != "none"])
    if not 0.0 <= cfg.eft_close <= 1.0:
        raise cli.ConfigError(f"--eft-close {cfg.eft_close}: a share, between 0 and 1")
    if cfg.n_meta < 1:
        raise cli.ConfigError(f"--n-meta {cfg.n_meta}: must be >= 1 (meta-judge examples in M1's seed)")
    if not 0.0 <= cfg.length_control < 1.0:
        raise cli.ConfigError(f"--length-control {cfg.length_control}: a share of the score range, in [0, 1)")
    kinds = loop_kinds(cfg)              # the tasks of the seeds, the loop and the evaluation
    check_format(cfg.m0.judge_format)    # the EFT seed's and the web text's judge format
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "selfreward" / "world")
    clock = Clock()
    thr = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if thr:   # the in-process stages (engine, measurement); the trainers get --threads
        import torch
        torch.set_num_threads(thr)

    mcfg = MeasureConfig(n_eval=cfg.n_eval, n_judge=cfg.n_judge, temperature=cfg.temperature, top_p=cfg.top_p,
                         samples=cfg.n_candidates, n_pass=cfg.n_pass,
                         judge_k=cfg.judge_k, judge_temperature=cfg.judge_temperature, kinds=kinds, seed=cfg.seed)
    results: dict[str, dict] = {}

    def evaluate(name: str, model_dir: str) -> dict:
        clock.banner(f"measuring {name} ({cfg.n_eval} held-out prompts, {cfg.n_judge} judge groups)")
        t = time.perf_counter()
        r = measure(model_dir, mcfg, cfg.engine)
        clock.stage("measure", time.perf_counter() - t)
        print(f"[world] {name}: greedy acc {r['greedy_acc']:.3f} (SE {r['greedy_acc_se']:.3f})  pass@{r['pass_n']} "
              f"{r['pass_at_n']:.3f}  sampled acc {r['sampled_acc']:.3f}  "
              f"judge pairwise {_f(r['judge_pairwise'])}  by kind {r['acc_by_kind']}  pass@N by kind "
              f"{r['pass_by_kind']}", flush=True)
        results[name] = r
        return r

    # the loop's config first (it checks its settings): a bad one is refused before the run folder records
    # these settings, and before M0 and SFT; the template is the world's constant, so writing it is harmless
    ift, eft = seed_paths(run_dir)
    m1 = run_dir / "m1"
    template = write_template(run_dir / "seed" / "judge_template.txt")
    meta_seed, mix = run_dir / "seed" / "meta.jsonl", run_dir / "seed" / "eft_meta.jsonl"
    prompts = run_dir / "seed" / "loop_prompts.jsonl"

    def hook(t_: int, model_dir: str) -> dict:
        return evaluate(f"M{t_}", model_dir)

    from selfreward.recipes.judge import JudgeConfig
    from selfreward.recipes.meta_judge import MetaJudgeConfig
    from selfreward.recipes.world.meta import CHOICES, LABEL, write_meta_seed, write_meta_template
    from selfreward.recipes.loop_config import CandidatesConfig
    from selfreward.train.dpo import DPOConfig
    dpo = DPOConfig(lr=cfg.dpo_lr, final_lr=cfg.dpo_lr / 10, beta=cfg.dpo_beta, nll_alpha=cfg.dpo_nll_alpha,
                    epochs=cfg.dpo_epochs, batch_size=cfg.dpo_batch, max_length=256 if cfg.meta_judge else 192, dropout=0.0,
                    log_every=10**6,
                    threads=thr)
    lc = LoopConfig(run_dir=str(run_dir / "loop"), init_model=str(m1), iterations=cfg.iterations,
                    prompt_source=str(prompts), n_prompts=cfg.n_prompts, min_margin=cfg.min_margin,
                    pairing=cfg.pairing, sft_mix=str(mix if cfg.meta_judge else eft) if cfg.eft_mix else "",
                    sft_mix_repeat=max(1, cfg.eft_mix), judge_self_train=cfg.judge_self_train,
                    meta_judge=cfg.meta_judge, length_control=cfg.length_control,
                    meta=MetaJudgeConfig(template=str(write_meta_template(run_dir / "seed" / "meta_template.txt")),
                                         temperature=0.0, max_tokens=64, label=LABEL, choices=CHOICES),
                    nproc=cfg.nproc, eval_hook=hook, seed=cfg.seed, engine=cfg.engine, dpo=dpo,
                    candidates=CandidatesConfig(n=cfg.n_candidates, temperature=cfg.temperature, top_p=cfg.top_p,
                                                max_tokens=mcfg.max_tokens),
                    judge=JudgeConfig(k=cfg.judge_k, temperature=cfg.judge_temperature, top_p=0.9,
                                      max_tokens=mcfg.judge_max_tokens, template=str(template), distinct=True))
    check_run_folder(run_dir, cfg)
    write_seeds(run_dir, cfg.n_ift, cfg.n_eft, cfg.seed, cfg.m0, kinds, cfg.eft_close)
    if cfg.meta_judge:
        write_meta_seed(meta_seed, mix, eft, cfg.n_meta, cfg.seed, kinds, cfg.eft_close)
    avoid = {r["prompt"] for r in read_jsonl(ift)}
    write_jsonl(prompts, loop_prompts(cfg.n_prompts * cfg.iterations, cfg.seed, avoid, kinds))

    clock.banner("M0 (the shipped one, or tokenizer + pretraining on web text, cached)")
    t = time.perf_counter()
    m0 = m0_folder(cfg.m0, cache, cfg.rebuild_m0, cfg.nproc, thr)
    clock.stage("m0", time.perf_counter() - t)

    evaluate("M0", str(m0))

    clock.banner("seeds (IFT + EFT) and M1 = train/sft.py on them")
    t = time.perf_counter()
    if not (m1 / "config.json").exists():
        from selfreward.train.sft import SFTConfig
        run_sft(SFTConfig(model=str(m0), data=[str(ift), str(eft)] + [str(meta_seed)] * cfg.meta_judge,
                          output=str(run_dir / "sft"), export=str(m1),
                          max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr, final_lr=cfg.sft_lr / 10,
                          max_length=256 if cfg.meta_judge else 128, dropout=0.0, seed=cfg.seed, resume=True, log_every=10**6, threads=thr),
                cfg.nproc)
    clock.stage("sft", time.perf_counter() - t)

    clock.banner(f"self-rewarding loop: {cfg.iterations} iterations of {cfg.n_prompts} prompts x "
                 f"{cfg.n_candidates} candidates x {cfg.judge_k} judgments, then DPO")
    t = time.perf_counter()
    manifests = run_loop(lc)
    loop_time = time.perf_counter() - t
    for m in manifests:
        for st, sec in m.get("timings", {}).items():
            clock.stage(f"loop_{st}", sec)
        for name, r in m.get("eval", {}).items():   # measured in an earlier, resumed run
            results.setdefault(name, r)
    clock.stage("loop_total_incl_measure", loop_time)

    rows_at: dict[str, dict] = {}                # name -> the stats of the iteration the model ran
    for t, m in enumerate(manifests, 1):
        rows_at[f"M{t}"] = iteration_stats(lc, t, m)
    for name in cfg.controls:
        clock.banner(f"control {name}: the same {cfg.iterations} iterations from M1, "
                         + {"oracle": "the checker's preferences", "fixed": "M1 judging every iteration",
                        "meta-oracle": "M_t judging, judge pairs from the reference meta-judgment"}[name])
        t0 = time.perf_counter()
        ms = run_control(name, lc, str(m1))
        clock.stage(f"control_{name}", time.perf_counter() - t0)
        cl = dataclasses.replace(lc, run_dir=str(Path(lc.run_dir).parent / "controls" / name))
        for t, m in enumerate(ms, 1):
            model = f"M{t + 1}-{name}"
            if name == "fixed" and t == 1:           # its M2 is the loop's M2
                continue
            evaluate(model, str(Path(cl.run_dir) / f"iter_{t}" / "model"))
            trained = iteration_stats(cl, t, m, ranking=False)
            results[model]["trained_on"] = {k: trained[k] for k in ("pairs", "pair_quality", "pair_backwards")}
            if t < len(ms):
                rows_at[model] = iteration_stats(cl, t + 1, ms[t], ranking=name != "oracle")

    rows, per_prompt = [], {}
    order = [f"M{i}" for i in range(cfg.iterations + 2)] + \
        [f"M{t}-{c}" for c in cfg.controls for t in range(2, cfg.iterations + 2)]
    for name in order:
        if name not in results:
            continue
        per_prompt[name] = results[name]["greedy_correct"]
        row = {"model": name, **{k: v for k, v in results[name].items() if k not in ("examples", "greedy_correct")},
               **rows_at.get(name, {})}
        rows.append(row)
    last = f"M{cfg.iterations + 1}"
    diffs = {f"{a} - {b}": paired(results, a, b) for a, b in
             [(last, "M1"), ("M2", "M1"), (last, "M2")] + [(f"{last}-{c}", "M1") for c in cfg.controls]
             + [(last, f"{last}-fixed")]}
    diffs = {k: v for k, v in diffs.items() if v is not None}
    wall = time.perf_counter() - clock.t0
    print("\n" + table(rows), flush=True)
    for k, v in diffs.items():
        print(f"[world] greedy {k}: {v['diff']:+.3f} (paired SE {v['se']:.3f}, {v['n']} prompts)", flush=True)
    png = plot(rows, run_dir / "curves.png")
    summary = {"rows": rows, "paired_differences": diffs, "wall_seconds": round(wall, 1),
               "stage_seconds": clock.stages, "config": cli.to_dict(cfg), "m0": str(m0),
               "plot": str(png) if png else None, "greedy_correct": per_prompt,
               "examples": {k: v.get("examples") for k, v in results.items()}}
    path = write_json(run_dir / "summary.json", summary)
    print(f"\n[world] wall time {wall:.0f}s; stages (s): {clock.stages}\n[world] summary: {path}"
          + (f"\n[world] plot: {png}" if png else ""), flush=True)
    return summary


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _parser():
    ap = cli.parser(DemoConfig, __doc__.split("\n")[0])
    ap.add_argument("--method", choices=("self-reward", "rlaif", "humpback"), default="self-reward",
                    help="rlaif: recipes/world/rlaif.py, humpback: recipes/world/humpback.py (own flags follow)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply data sizes, steps and prompts")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage at tiny sizes from the shipped M0 (CI; checks an install)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="self-reward")
    m, rest = pre.parse_known_args(argv)
    if m.method == "rlaif":
        from selfreward.recipes.world.rlaif import main as rlaif_main
        return rlaif_main(rest)
    if m.method == "humpback":                 # recipes/world/humpback.py (its own flags follow)
        from selfreward.recipes.world.humpback import main as humpback_main
        return humpback_main(rest)
    a = _parser().parse_args(argv)
    cfg = smoke_config(a.run_dir or "runs/world-smoke", a.cache_dir or "") if a.smoke else DemoConfig()
    if a.scale != 1.0:
        cfg = cfg.scaled(a.scale)
    given = cli.to_dict(cli.build(DemoConfig, a))     # flags over DemoConfig's defaults...
    flags = {k for k in a._cfg_dests if getattr(a, k) is not None}
    base = cli.to_dict(cfg)                           # ...but only the flags given override smoke / scale
    for k in flags:
        sec, _, name = k.rpartition(".")
        (base[sec] if sec else base)[name] = (given[sec] if sec else given)[name]
    return run(cli.from_dict(DemoConfig, base))


if __name__ == "__main__":
    cli.run_main(main)
