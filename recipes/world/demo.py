"""The embedded default: the whole self-rewarding loop on the checkable world, on a CPU, in minutes.

    python -m selfreward.recipes.world.demo                          # the default run (runs/world)
    python -m selfreward.recipes.world.demo --seed 1 --run-dir runs/world-s1
    python -m selfreward.recipes.world.demo --scale 2 --iterations 3 # bigger: more web text, steps, prompts
    python -m selfreward.recipes.world.demo --smoke                  # every stage at tiny sizes (the CI test)
    python -m selfreward.recipes.world.demo --real-model M0 --oasst-seed data/seed --nproc 8   # a real checkpoint + OASST

Stages: tokenizer + M0 (cached) -> seeds (IFT, EFT in the world's judge format) -> M1 = train/sft.py on the
seeds -> recipes.self_reward (prompts, N candidates, K self-judgments, pairs, train/dpo.py) -> M2 -> M3.
After each model the checker measures held-out accuracy and the judge's agreement (recipes/world/measure.py);
per iteration the report sets the self-judge's ranking of the model's own right and wrong samples against the
model's likelihood; the oracle control (M2*: the same DPO from M1 on the checker's pairs) bounds what DPO on
those candidates can do. The figures go to a terminal table, RUN/summary.json and RUN/curves.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig
from selfreward.recipes.world.build import WorldModelConfig, build_m0, run_sft, write_seeds
from selfreward.recipes.world.measure import MeasureConfig, measure


@dataclass
class DemoConfig:
    run_dir: str = "runs/world"
    cache_dir: str = ""               # "" = ~/.cache/selfreward/world
    seed: int = 0
    iterations: int = 2
    nproc: int = 1                    # ranks for train/sft.py, train/dpo.py and the sampling stages (torchrun)
    threads: int = 0
    # seeds and M1
    n_ift: int = 300
    n_eft: int = 500
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 3e-4
    # each iteration
    n_prompts: int = 3000             # most prompts' candidates are all one text (no pair, not judged)
    n_candidates: int = 8
    temperature: float = 1.0          # the paper's 0.7 left 32 of 300 prompts with two distinct candidates
    top_p: float = 0.9
    judge_k: int = 3
    judge_temperature: float = 0.7
    min_margin: float = 0.0           # recipes.self_reward --min-margin: drop pairs whose score gap is smaller
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    dpo_nll_alpha: float = 1.0        # train/dpo.py --nll-alpha: + alpha * chosen NLL per token (RPO)
    dpo_epochs: int = 3
    dpo_batch: int = 16
    # the oracle control: DPO from M1 on pairs the checker picks among iteration 1's candidates, measured
    # like the rest (row "M2*"): what the same DPO reaches when the preferences are right
    oracle_control: bool = True
    # evaluation
    n_eval: int = 200
    n_judge: int = 100
    m0: WorldModelConfig = field(default_factory=WorldModelConfig)   # --m0-hidden, --m0-kinds, ...
    engine: EngineConfig = field(default_factory=EngineConfig)       # --engine-device, --engine-dtype, ...

    def scaled(self, s: float) -> "DemoConfig":
        """Sizes times s (steps, data, prompts); the model's shape is set by its own flags."""
        m = dataclasses.replace(self.m0, web_docs=int(self.m0.web_docs * s),
                                pretrain_steps=int(self.m0.pretrain_steps * s))
        return dataclasses.replace(self, m0=m, n_ift=int(self.n_ift * s), n_eft=int(self.n_eft * s),
                                   sft_steps=int(self.sft_steps * s), n_prompts=int(self.n_prompts * s))


def smoke_config(run_dir: str, cache_dir: str) -> DemoConfig:
    """Every stage, tiny sizes: what tests/test_world_smoke.py runs."""
    m = WorldModelConfig(hidden=32, layers=2, heads=2, ffn=64, web_docs=2000, web_p_judge=0.5, pretrain_steps=120,
                         pretrain_batch=16, pretrain_lr=1e-2)
    return DemoConfig(run_dir=run_dir, cache_dir=cache_dir, n_ift=24, n_eft=48, sft_steps=10, sft_batch=8,
                      n_prompts=12, n_candidates=3, judge_k=2, judge_temperature=1.0, temperature=1.0,
                      dpo_epochs=1, dpo_batch=4, n_eval=10, n_judge=5, m0=m)


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 2)

    def banner(self, text: str) -> None:
        print(f"\n[world {time.perf_counter() - self.t0:7.1f}s] {text}", flush=True)


def run(cfg: DemoConfig) -> dict:
    from selfreward.recipes.self_reward import LoopConfig, run_loop
    from selfreward.recipes.world.data import loop_prompts
    from selfreward.recipes.world.judging import check_format, write_template
    from selfreward.recipes.world.report import pair_quality, plot, table, write_summary
    from selfreward.records import read_jsonl, write_jsonl

    kinds = cfg.m0.kind_tuple()          # the world's task kinds (every generator and the evaluation)
    check_format(cfg.m0.judge_format)    # the EFT seed's and the web text's judge format
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "selfreward" / "world")
    clock = Clock()
    thr = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if thr:   # the in-process stages (engine, measurement); the trainers get --threads
        import torch
        torch.set_num_threads(thr)

    clock.banner("tokenizer + M0 (pretraining on web text with imperfect answers; cached)")
    t = time.perf_counter()
    m0 = build_m0(cache, cfg.m0, cfg.nproc, thr)
    clock.stage("m0", time.perf_counter() - t)

    mcfg = MeasureConfig(n_eval=cfg.n_eval, n_judge=cfg.n_judge, temperature=cfg.temperature, top_p=cfg.top_p,
                         judge_k=cfg.judge_k, judge_temperature=cfg.judge_temperature, kinds=kinds, seed=cfg.seed)
    results: dict[str, dict] = {}

    def evaluate(name: str, model_dir: str) -> dict:
        clock.banner(f"measuring {name} ({cfg.n_eval} held-out prompts, {cfg.n_judge} judge groups)")
        t = time.perf_counter()
        r = measure(model_dir, mcfg, cfg.engine)
        clock.stage("measure", time.perf_counter() - t)
        print(f"[world] {name}: greedy acc {r['greedy_acc']:.3f}  sampled acc {r['sampled_acc']:.3f}  "
              f"judge pairwise {_f(r['judge_pairwise'])}  by kind {r['acc_by_kind']}", flush=True)
        results[name] = r
        return r

    evaluate("M0", str(m0))

    clock.banner("seeds (IFT + EFT) and M1 = train/sft.py on them")
    t = time.perf_counter()
    ift, eft = write_seeds(run_dir, cfg.n_ift, cfg.n_eft, cfg.seed, cfg.m0)
    m1 = run_dir / "m1"
    if not (m1 / "config.json").exists():
        from selfreward.train.sft import SFTConfig
        run_sft(SFTConfig(model=str(m0), data=[str(ift), str(eft)], output=str(run_dir / "sft"), export=str(m1),
                          max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr, final_lr=cfg.sft_lr / 10,
                          max_length=128, dropout=0.0, seed=cfg.seed, resume=True, log_every=50, threads=thr),
                cfg.nproc)
    clock.stage("sft", time.perf_counter() - t)

    template = write_template(run_dir / "seed" / "judge_template.txt")
    avoid = {r["prompt"] for r in read_jsonl(ift)}
    prompts = run_dir / "seed" / "loop_prompts.jsonl"
    write_jsonl(prompts, loop_prompts(cfg.n_prompts * cfg.iterations, cfg.seed, avoid, kinds))

    def hook(t_: int, model_dir: str) -> dict:
        return evaluate(f"M{t_}", model_dir)

    from selfreward.recipes.judge import JudgeConfig
    from selfreward.recipes.self_reward import CandidatesConfig
    from selfreward.train.dpo import DPOConfig
    dpo = DPOConfig(lr=cfg.dpo_lr, final_lr=cfg.dpo_lr / 10, beta=cfg.dpo_beta, nll_alpha=cfg.dpo_nll_alpha,
                    epochs=cfg.dpo_epochs, batch_size=cfg.dpo_batch, max_length=192, dropout=0.0, log_every=10,
                    threads=thr)
    lc = LoopConfig(run_dir=str(run_dir / "loop"), init_model=str(m1), iterations=cfg.iterations,
                    prompt_source=str(prompts), n_prompts=cfg.n_prompts, min_margin=cfg.min_margin,
                    nproc=cfg.nproc, eval_hook=hook, seed=cfg.seed, engine=cfg.engine, dpo=dpo,
                    candidates=CandidatesConfig(n=cfg.n_candidates, temperature=cfg.temperature, top_p=cfg.top_p,
                                                max_tokens=mcfg.max_tokens),
                    judge=JudgeConfig(k=cfg.judge_k, temperature=cfg.judge_temperature, top_p=0.9,
                                      max_tokens=mcfg.judge_max_tokens, template=str(template), distinct=True))
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

    if cfg.oracle_control and manifests:
        clock.banner("oracle control: DPO from M1 on the checker's pairs among iteration 1's candidates")
        t = time.perf_counter()
        oracle = oracle_control(run_dir, lc, m1)
        clock.stage("oracle_control", time.perf_counter() - t)
        if oracle:
            evaluate("M2*", oracle["model"])
            results["M2*"].update(oracle_pairs=oracle["pairs"])

    rows = []
    for i in range(cfg.iterations + 2):
        name = f"M{i}"
        if name not in results:
            continue
        row = {"model": name, **{k: v for k, v in results[name].items() if k != "examples"}}
        if 1 <= i <= len(manifests):
            m = manifests[i - 1]
            c = m["counts"]
            pairs = read_jsonl(Path(lc.run_dir) / f"iter_{i}" / "pairs.jsonl")
            row.update(pairs=c["pairs"], ties=c["ties"], parse_failures=c["parse_failures"],
                       judgments=c["judgments"], candidate_len_tokens=m["mean_len"]["candidate_tokens"],
                       **pair_quality(pairs), **self_judge_vs_likelihood(lc, i))
        rows.append(row)
    if "M2*" in results:
        rows.append({"model": "M2*", **{k: v for k, v in results["M2*"].items() if k != "examples"}})
    wall = time.perf_counter() - clock.t0
    print("\n" + table(rows), flush=True)
    png = plot(rows, run_dir / "curves.png")
    summary = {"rows": rows, "wall_seconds": round(wall, 1), "stage_seconds": clock.stages,
               "config": cli.to_dict(cfg), "m0": str(m0), "plot": str(png) if png else None,
               "examples": {k: v.get("examples") for k, v in results.items()}}
    path = write_summary(run_dir, summary)
    print(f"\n[world] wall time {wall:.0f}s; stages (s): {clock.stages}\n[world] summary: {path}"
          + (f"\n[world] plot: {png}" if png else ""), flush=True)
    return summary


def oracle_pairs(prompts: dict[str, str], candidates: list[dict]) -> list[dict]:
    """One pair per prompt whose distinct candidate texts are partly right, partly wrong (by the checker):
    its first right text (in sample order) over its first wrong one."""
    from selfreward.recipes.pairs import distinct_candidates
    from selfreward.recipes.world.checker import check
    by: dict[str, dict[str, float]] = {}
    for c in distinct_candidates(candidates):       # first sample of each text, prompts with two or more
        by.setdefault(c["id"], {})[c["text"]] = check(prompts[c["id"]], c["text"])
    out = []
    for pid, texts in by.items():
        right = [x for x, v in texts.items() if v == 1.0]
        wrong = [x for x, v in texts.items() if v == 0.0]
        if right and wrong:
            out.append({"id": pid, "prompt": prompts[pid], "chosen": right[0], "rejected": wrong[0]})
    return out


def oracle_control(run_dir: Path, lc, m1: Path) -> dict | None:
    """DPO from M1 with the loop's own settings on oracle_pairs of iteration 1 -> {"model", "pairs"}."""
    from selfreward.records import read_jsonl, write_jsonl
    from selfreward.recipes.self_reward import iter_dir
    it = iter_dir(lc, 1)
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    pairs = oracle_pairs(prompts, read_jsonl(it / "candidates.jsonl"))
    if not pairs:
        print("[world] oracle control: iteration 1 has no prompt with right and wrong candidates", flush=True)
        return None
    home = run_dir / "oracle"
    data = write_jsonl(home / "pairs.jsonl", pairs)
    if not (home / "model" / "config.json").exists():
        from selfreward.train.dpo import train
        dcfg = dataclasses.replace(lc.dpo, model=str(m1), data=[str(data)], output=str(home / "dpo"),
                                   export=str(home / "model"), resume=True)
        cli.launch(train, dcfg, "selfreward.train.dpo", lc.nproc, home / "dpo_config.json")
    return {"model": str(home / "model"), "pairs": len(pairs)}


def self_judge_vs_likelihood(lc, t: int) -> dict:
    """recipes.world.report.ranking_on_mixed on iteration t's files, the likelihood under M_t."""
    from selfreward.records import read_jsonl
    from selfreward.recipes.judge import chat_prompt_ids
    from selfreward.recipes.session import Session
    from selfreward.recipes.self_reward import iter_dir, model_at
    from selfreward.recipes.world.report import ranking_on_mixed

    it = iter_dir(lc, t)
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    engine, tok = Session(lc.engine).get(model_at(lc, t))

    def likelihood(items):
        lps = engine.score([chat_prompt_ids(tok, p) for p, _ in items], [tok.render_response(x) for _, x in items])
        return [sum(lp) for lp in lps]
    r = ranking_on_mixed(prompts, read_jsonl(it / "candidates.jsonl"), read_jsonl(it / "judgments.jsonl"), likelihood)
    print(f"[world] iteration {t}: {r['mixed_prompts']} prompts with right and wrong candidates; of their "
          f"{r['right_wrong_pairs']} (right, wrong) text pairs the self-judge ranks right higher in "
          f"{_f(r.get('judge_rw'))} and wrong higher in {_f(r.get('judge_wr'))}; M{t}'s own likelihood: "
          f"{_f(r.get('likelihood_rw'))} / {_f(r.get('likelihood_wr'))}", flush=True)
    return r


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


REAL_FLAGS = {"judge_template": ("judge", "template"), "max_tokens": ("candidates", "max_tokens"),
              "judge_max_tokens": ("judge", "max_tokens"), "score_from": ("", "score_from")}


def _parser():
    ap = cli.parser(DemoConfig, __doc__.split("\n")[0])
    ap.add_argument("--method", choices=("self-reward", "rlaif", "humpback"), default="self-reward",
                    help="rlaif: recipes/world/rlaif.py, humpback: recipes/world/humpback.py (own flags follow)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply data sizes, steps and prompts")
    ap.add_argument("--smoke", action="store_true", help="every stage at tiny sizes (CI)")
    ap.add_argument("--real-model", help="instead of the world: this HF checkpoint as M0 (see recipes/real.py)")
    ap.add_argument("--oasst-seed", help="with --real-model: the folder `python -m selfreward.recipes.oasst --out` wrote")
    ap.add_argument("--judge-template", help="with --real-model: a rubric file or built-in name (default, short)")
    ap.add_argument("--max-tokens", type=int, help="with --real-model: candidate length limit (default 512)")
    ap.add_argument("--judge-max-tokens", type=int, help="with --real-model: judgment length limit (default 256)")
    ap.add_argument("--score-from", choices=("sampled", "expected"),
                    help="with --real-model: pairs from the sampled scores (default) or the expected score")
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
    if a.real_model or a.oasst_seed:
        if not (a.real_model and a.oasst_seed):
            raise cli.ConfigError("--real-model and --oasst-seed go together")
        from selfreward.recipes.real import run_real
        loop: dict = {"candidates": {}, "judge": {}, "dpo": {}}
        for name, (sec, key) in {"n_candidates": ("candidates", "n"), "temperature": ("candidates", "temperature"),
                                 "top_p": ("candidates", "top_p"), "judge_k": ("judge", "k"),
                                 "judge_temperature": ("judge", "temperature"), "min_margin": ("", "min_margin"),
                                 "dpo_lr": ("dpo", "lr"), "dpo_beta": ("dpo", "beta"),
                                 "dpo_nll_alpha": ("dpo", "nll_alpha"), **REAL_FLAGS}.items():
            if getattr(a, name, None) is not None:
                (loop if not sec else loop[sec])[key] = getattr(a, name)
        return run_real(a.real_model, a.oasst_seed, a.run_dir or "runs/real", a.iterations or 2,
                        a.n_prompts or 1000, a.nproc or 1, a.seed or 0, loop=loop, sft_steps=a.sft_steps or 0)
    cfg = smoke_config(a.run_dir or "runs/world-smoke", a.cache_dir or "") if a.smoke else DemoConfig()
    if a.scale != 1.0:
        cfg = cfg.scaled(a.scale)
    given = cli.to_dict(cli.build(DemoConfig, a))     # flags over DemoConfig's defaults...
    flags = {k for k in a._cfg_dests if getattr(a, k) is not None}
    base = cli.to_dict(cfg)                           # ...but only the flags given override smoke / scale
    for k in flags:
        sec, _, name = k.rpartition(".")
        (base[sec] if sec else base)[name] = (given[sec] if sec else given)[name]
    if "seed" in flags and "m0.seed" not in flags:
        base["m0"]["seed"] = base["seed"]
    return run(cli.from_dict(DemoConfig, base))


if __name__ == "__main__":
    cli.run_main(main)
