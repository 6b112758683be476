"""RLAIF in the checkable world: part 1, AI labels on the world's candidate pairs and the distilled RM, with
the checker as the truth; part 2, RL from M1 against three reward sources (recipes/world/rlaif_rl.py).

    python -m selfreward.recipes.world.demo --method rlaif     # runs/world-rlaif; 10-13 min measured (M0 shipped)
    python -m selfreward.recipes.world.demo --method rlaif --seed 1 --run-dir runs/world-rlaif-s1

Stages: M0 (the world's cached M0, recipes/world/build.py) -> seeds (IFT, EFT, and a pairwise-label seed)
-> M1 = train/sft.py on them (the labeller, and the policy's size: the paper's same-size setting) -> M1
samples candidates for fresh train-split prompts -> one pair of distinct candidate texts per prompt, in a
random order -> soft labels by M1 in both orders (recipes.rlaif): direct, after reasons sampled in the pair's
prompt (cot), and after M1's judgment of each answer alone in the judge's prompt (checked, `--checks`) ->
train/rm.py from M1 on the checked labels of 75% of the prompts -> the RM on the other 25% -> part 2: train/rl.py from
M1 against the checker, the RM and M1's direct scores (recipes/world/rlaif_rl.py; `rows`, `sync_share` and
RUN/rl_curves.png; --rl-sources to choose, --rl-steps 0 to skip).

The pairwise seed is to pairwise labelling what the EFT seed is to judging: checker-labelled examples of
the format (a small world model cannot label zero-shot), half direct ("Preferred: k"), half with the
reasons first (the world's check steps for both answers). The labels the figures measure are M1's own, on
its own samples for prompts no seed holds. M1 here is therefore not the self-rewarding demo's M1 (that one
has no pairwise seed).
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig
from selfreward.recipes.prompts import fill
from selfreward.recipes.world.build import WorldModelConfig
from selfreward.recipes.world.judging import JUDGE_TEMPLATE

from selfreward.recipes.rlaif import LabelConfig, LabelTemplate, position_bias, soft_labels
from selfreward.recipes.world.labels import agreement, reliability
from selfreward.recipes.world.rlaif_rl import SOURCES, WorldRLConfig, plot, rl_stage, table

# The task once, the two answers after it; the reasons are the world's check steps (recipes/world/judging.py)
# for answer 1, then for answer 2, in the layout M0's web text taught it to check. With --checks (the
# "checked" labels) each check is the labeller's own judgment of the answer alone, in the judge's prompt.
WORLD_TEMPLATE = LabelTemplate(
    preamble="Judge two answers. Give the answer whose every symbol matches.",
    sample="Task: {context} 1: {response_1} 2: {response_2}",
    ending="Preferred:", cot_request=" Check both.",
    check=JUDGE_TEMPLATE.replace("{instruction}", "{context}"), check_rationale="1: {check_1} 2: {check_2}")
LABELS = {"direct": (False, False), "cot": (True, False), "checked": (True, True)}   # name: (cot, checks)


@dataclass
class RLAIFWorldConfig:
    run_dir: str = cli.passive("runs/world-rlaif")
    cache_dir: str = cli.passive("")               # M0's cache ("" = ~/.cache/selfreward/world)
    seed: int = 0                     # seeds, sampling, the RM's head and order; M0 fixed by its own key
    threads: int = cli.passive(0)
    nproc: int = cli.passive(1)                    # ranks for train/sft.py and train/rm.py (torchrun)
    n_ift: int = 300
    n_eft: int = 5000                 # the labeller's judging examples (issue 36: 500 were too few to check)
    n_pref: int = 2000                # pairwise-label seed (half direct, half chain-of-thought)
    sft_steps: int = 1500
    sft_batch: int = 16
    sft_lr: float = 3e-4
    n_prompts: int = 3000             # fresh train-split prompts; those with two distinct candidates make a pair
    n_candidates: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_tokens: int = 24
    cot_max_tokens: int = 96
    rm_labels: str = "checked"        # which labels train the RM: checked | cot | direct
    heldout_fraction: float = 0.25    # share of the pairs' prompts kept from the RM
    rm_epochs: int = 8
    rm_batch: int = 16
    rm_lr: float = 3e-4
    n_control: int = 200              # held-out right-vs-one-edit pairs labelled as a control (seed-like)
    m0: WorldModelConfig = field(default_factory=WorldModelConfig)   # M0's settings (its cache key); --m0-*
    rl: WorldRLConfig = field(default_factory=WorldRLConfig, metadata=cli.PASSIVE)   # part 2, RL from M1; --rl-*
    engine: EngineConfig = field(default_factory=EngineConfig)       # M1's sampler and labeller, and RL's; --engine-*


def pref_seed(n: int, seed: int, mc: WorldModelConfig | None = None) -> list[dict]:
    """Checker-labelled pairs in the label format: (right or wrong) against wrong, in a random order."""
    from selfreward.recipes.world.data import eft_candidate
    from selfreward.recipes.world.judging import judgment
    from selfreward.recipes.world.tasks import corrupt, sample_tasks
    mc = mc or WorldModelConfig()
    rng = random.Random(f"pref:{seed}")
    t = WORLD_TEMPLATE
    out = []
    for task in sample_tasks(n, seed=50_000 + seed, kinds=mc.kind_tuple()):
        a = task.answer if rng.random() < 0.6 else eft_candidate(task, rng)
        b = corrupt(task.answer, rng)
        while b == a:
            b = corrupt(task.answer, rng)
        if rng.random() < 0.5:
            a, b = b, a
        ra, rb = a == task.answer, b == task.answer
        k = 1 if ra else 2 if rb else rng.choice((1, 2))      # both wrong: no truth, either label
        cot = rng.random() < 0.5
        user = t.sample.format(context=task.prompt, response_1=a, response_2=b) + (t.cot_request if cot else "")
        why = fill(t.check_rationale, check_1=judgment(task, a, fmt=mc.judge_format),
                   check_2=judgment(task, b, fmt=mc.judge_format)) + " " if cot else ""
        out.append({"messages": [{"role": "system", "content": t.preamble}, {"role": "user", "content": user},
                                 {"role": "assistant", "content": f"{why}{t.ending} {k}"}]})
    return out


def candidate_pairs(engine, tok, prompts: list[dict], cfg: RLAIFWorldConfig) -> list[dict]:
    """M1's candidates -> per prompt with two distinct texts, one random pair in a random order (+ truth)."""
    from selfreward.infer.sequence import SamplingParams
    from selfreward.recipes.world.checker import check
    ids = [tok.user_ids(p["prompt"]) for p in prompts]
    ps = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                         seed=cfg.seed * 1_000_003 + i * cfg.n_candidates) for i in range(len(ids))]
    outs = engine.generate(ids, ps, n=cfg.n_candidates)
    rng = random.Random(f"pairs:{cfg.seed}")
    pairs = []
    for p, group in zip(prompts, outs):
        texts = list(dict.fromkeys(c.text for c in group))
        if len(texts) < 2:
            continue
        a, b = rng.sample(texts, 2)
        pairs.append({"id": p["id"], "prompt": p["prompt"], "response_1": a, "response_2": b,
                      "right": [check(p["prompt"], a), check(p["prompt"], b)]})
    return pairs


def seedlike_pairs(n: int, seed: int, mc: WorldModelConfig) -> list[dict]:
    """A control: held-out instances, the right answer against a one-edit wrong one in a random order (the
    pairwise seed's easiest contrast, on tasks no seed holds)."""
    from selfreward.recipes.world.tasks import corrupt, heldout_eval_set
    rng = random.Random(f"seedlike:{seed}")
    out = []
    for i, t in enumerate(heldout_eval_set(n, seed=777 + seed, kinds=mc.kind_tuple())):
        a, b = t.answer, corrupt(t.answer, rng)
        first = rng.random() < 0.5
        out.append({"id": f"c{i}", "prompt": t.prompt, "response_1": a if first else b,
                    "response_2": b if first else a, "right": [first, not first]})
    return out


def run(cfg: RLAIFWorldConfig) -> dict:
    import torch

    from selfreward.infer.config import load_engine
    from selfreward.records import read_jsonl, write_json, write_jsonl
    from selfreward.recipes.world.build import m0_folder, run_sft, write_seeds
    from selfreward.recipes.world.data import loop_prompts
    from selfreward.train.sft import SFTConfig

    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name, since):
        stages[name] = round(time.perf_counter() - since, 1)
        print(f"[rlaif {time.perf_counter() - t0:6.1f}s] {name} done", flush=True)

    from selfreward.recipes.world.demo import check_run_folder
    mc = cfg.m0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    if cfg.rm_labels not in LABELS:
        raise cli.ConfigError(f"--rm-labels {cfg.rm_labels}: choose from {', '.join(LABELS)}")
    bad = [src for src in cfg.rl.sources if src not in SOURCES]
    if bad:
        raise cli.ConfigError(f"--rl-sources {bad[0]!r}: choose from {', '.join(SOURCES)} (space-separated)")
    # M1, the pairs and the RM are skipped when present: a rerun with other settings is refused (the RL
    # settings are checked per --rl-dir, in rl_stage: another --rl-dir reuses M1 and the RM)
    check_run_folder(run_dir, cfg, "rlaif_settings.json")
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "selfreward" / "world")
    t = time.perf_counter()
    m0 = m0_folder(mc, cache, False, cfg.nproc, cfg.threads)
    stage("m0", t)

    t = time.perf_counter()
    ift, eft = write_seeds(run_dir, cfg.n_ift, cfg.n_eft, cfg.seed, mc)
    pref = write_jsonl(run_dir / "seed" / "pref.jsonl", pref_seed(cfg.n_pref, cfg.seed, mc))
    m1 = run_dir / "m1"
    if not (m1 / "config.json").exists():
        run_sft(SFTConfig(model=str(m0), data=[str(ift), str(eft), str(pref)], output=str(run_dir / "sft"),
                          export=str(m1), max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
                          final_lr=cfg.sft_lr / 10, max_length=256, dropout=0.0, seed=cfg.seed, resume=True,
                          log_every=50, threads=cfg.threads), cfg.nproc)
    stage("sft", t)

    engine = load_engine(m1, cfg.engine)      # CUDA + bf16 where there is one, unless --engine-device says
    tok = engine.tokenizer
    pairs_path = run_dir / "pairs.jsonl"
    t = time.perf_counter()
    if not pairs_path.exists():
        avoid = {r["prompt"] for r in read_jsonl(ift)}
        prompts = loop_prompts(cfg.n_prompts, 60_000 + cfg.seed, avoid, mc.kind_tuple())
        write_jsonl(pairs_path, candidate_pairs(engine, tok, prompts, cfg))
    pairs = read_jsonl(pairs_path)
    stage("candidates", t)

    results: dict[str, dict] = {}
    items = [(p["prompt"], p["response_1"], p["response_2"]) for p in pairs]
    control = seedlike_pairs(cfg.n_control, cfg.seed, mc)
    for name, (cot, checks) in LABELS.items():
        t = time.perf_counter()
        lcfg = LabelConfig(cot=cot, checks=checks, cot_max_tokens=cfg.cot_max_tokens, seed=cfg.seed,
                           template=WORLD_TEMPLATE)
        ctl = soft_labels(engine, tok, [(p["prompt"], p["response_1"], p["response_2"]) for p in control], lcfg)
        lab = soft_labels(engine, tok, items, lcfg)
        recs = lab["records"]
        write_jsonl(run_dir / f"labels_{name}.jsonl",
                    [dict(p, **{k: v for k, v in r.items()}) for p, r in zip(pairs, recs)])
        results[name] = {"agreement": agreement(pairs, recs), "reliability": reliability(pairs, recs),
                         "position_bias": position_bias(recs), "prefill": lab["prefill"],
                         "prompts_cut": lab["prompts_cut"],
                         "control_agreement": agreement(control, ctl["records"])["both_orders"]}
        stage(f"labels_{name}", t)

    t = time.perf_counter()
    rm = rm_stage(run_dir, m1, pairs, cfg)
    stage("rm", t)

    t = time.perf_counter()
    rl = {"rows": [], "sync_share": None}
    if cfg.rl.sources and cfg.rl.steps > 0:
        rl = rl_stage(run_dir, m1, Path(rm["model"]), {r["prompt"] for r in read_jsonl(ift)}, cfg.seed,
                      mc.kind_tuple(), cfg.rl, cfg.threads, cfg.nproc, cfg.engine)
    png = plot(rl, run_dir / f"{cfg.rl.dir}_curves.png") if rl["rows"] else None
    stage("rl", t)

    main = results[cfg.rm_labels]
    summary = {
        "label_agreement": main["agreement"]["both_orders"],
        "position_bias_one_order": main["position_bias"]["one_order"],
        "position_bias_both_orders": main["position_bias"]["both_orders"],
        "rm_pairwise": rm["heldout_pairwise"],
        "labels_for_rm": cfg.rm_labels, "labels": results, "rm": rm,
        "rows": rl["rows"], "sync_share": rl["sync_share"], "rl_curves": rl.get("curves"),
        "rl_plot": str(png) if png else None,
        "pairs": len(pairs), "pairs_one_right": sum(sum(p["right"]) == 1 for p in pairs),
        "wall_seconds": round(time.perf_counter() - t0, 1), "stage_seconds": stages,
        "config": dataclasses.asdict(cfg), "m0": str(m0),
    }
    write_json(run_dir / "summary.json", summary)
    print(report(summary), flush=True)
    return summary


def rm_stage(run_dir: Path, m1: Path, pairs: list[dict], cfg: RLAIFWorldConfig) -> dict:
    """train/rm.py on the labels of the training prompts; the RM's pairwise accuracy on the held-out ones."""
    from selfreward.records import read_jsonl, write_jsonl
    from selfreward.model.reward_model import RMReward
    from selfreward.cli import launch
    from selfreward.train.rm import RMConfig, train as train_rm
    labels = read_jsonl(run_dir / f"labels_{cfg.rm_labels}.jsonl")
    ids = sorted({p["id"] for p in pairs})
    random.Random(f"split:{cfg.seed}").shuffle(ids)
    held = set(ids[:int(len(ids) * cfg.heldout_fraction)])
    rows = [{"prompt": r["prompt"], "response_1": r["response_1"], "response_2": r["response_2"],
             "label": r["label"]} for r in labels if r["id"] not in held]
    data = write_jsonl(run_dir / "rm_train.jsonl", rows)
    out = run_dir / "rm"
    if not (out / "model" / "config.json").exists():
        rc = RMConfig(model=str(m1), data=[str(data)], output=str(out), epochs=cfg.rm_epochs,
                      batch_size=cfg.rm_batch, lr=cfg.rm_lr, final_lr=cfg.rm_lr / 10, max_length=128, dropout=0.0,
                      seed=cfg.seed, head_seed=cfg.seed, resume=True, log_every=20, threads=cfg.threads)
        launch(train_rm, rc, "selfreward.train.rm", cfg.nproc, out / "rm_config.json")
    reward = RMReward(out / "model")
    test = [p for p in pairs if p["id"] in held and sum(p["right"]) == 1]
    r1 = reward([p["prompt"] for p in test], [p["response_1"] for p in test])
    r2 = reward([p["prompt"] for p in test], [p["response_2"] for p in test])
    ok = [(a > b) == bool(p["right"][0]) for p, a, b in zip(test, r1, r2) if a != b]
    return {"heldout_pairwise": sum(ok) / len(ok) if ok else None, "heldout_pairs": len(test),
            "train_pairs": len(rows), "ties": len(test) - len(ok), "model": str(out / "model")}


def report(s: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"[rlaif] {s['pairs']} pairs ({s['pairs_one_right']} with exactly one right answer)",
             "| labels | agreement (one order) | agreement (both) | position bias (one order) | (both) | "
             "order-consistent | ECE | prefill saved | control agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["labels"].items():
        a, b = r["agreement"], r["position_bias"]
        lines.append(f"| {name} | {f(a['one_order'])} | {f(a['both_orders'])} | {f(b['one_order'])} | "
                     f"{f(b['both_orders'])} | {f(b['order_consistent'])} | {f(r['reliability']['ece'])} | "
                     f"{f(r['prefill']['saved'])} | {f(r['control_agreement'])} |")
    lines.append(f"RM ({s['labels_for_rm']} labels, {s['rm']['train_pairs']} pairs): held-out pairwise accuracy "
                 f"{f(s['rm_pairwise'])} on {s['rm']['heldout_pairs']} pairs; wall {s['wall_seconds']}s")
    if s["rows"]:
        lines.append(table(s))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Flags: every RLAIFWorldConfig field (--n-prompts, --rm-labels, ...) and --m0-* for M0's fields."""
    a = cli.parser(RLAIFWorldConfig, "RLAIF part 1 in the checkable world").parse_args(argv)
    return run(cli.build(RLAIFWorldConfig, a))


if __name__ == "__main__":
    cli.run_main(main)
