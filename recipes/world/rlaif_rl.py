"""RLAIF in the checkable world, part 2: online RL from M1 (train/rl.py) against three reward sources, judged
by the checker.

    checker   the world's checker, 1 right / 0 wrong: the upper bound (a perfect labeller)
    rm        the distilled RM of part 1 (train/rm.py on M1's soft labels)
    direct    direct RLAIF: M1 itself scores each reply 1-10 (recipes.rlaif.direct_scores) with the world's
              judge phrase as the sample, rescaled to [-1, 1]

Each run starts from M1 with the same prompts (fresh train-split tasks, none an IFT seed) and the same
settings; M1 is also the frozen reference of the KL penalty. The trainer's own engine writes the greedy
replies to the fixed held-out prompts every `probe_every` steps (probes.jsonl), so the accuracy curve is
measured on the very weights the sampler holds after each hand-off. Reported per model:
    greedy_acc        held-out greedy accuracy (checker) of the final policy; the SFT row is M1 (step 0)
    win_rate_vs_sft   per held-out prompt, the final policy's greedy reply against M1's, judged by the
                      checker: win = right vs wrong, loss = wrong vs right, tie (both right or both wrong)
                      counts half. With a right/wrong judge this is 0.5 + (acc - acc_SFT) / 2 up to the
                      prompts both get right or wrong, and M1 against itself is 0.5 by definition.
    sync_share        the weight hand-off's share of the step time (mean over steps)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfreward import cli
from selfreward.recipes.metrics import paired_diff
from selfreward.recipes.world.judging import JUDGE_TEMPLATE

SOURCES = ("checker", "rm", "direct")


@dataclass
class WorldRLConfig:
    sources: list[str] = cli.passive(list(SOURCES))   # checker | rm | direct (any subset)
    steps: int = 100
    batch: int = 64                   # prompts per step
    num_samples: int = 1              # responses per prompt (rloo: >= 2)
    estimator: str = "reinforce"      # reinforce (value baseline) | rloo (train/rl.py)
    lr: float = 1e-4
    beta: float = 0.05                # the paper's KL penalty
    temperature: float = 0.9          # the paper's sampling temperature
    max_tokens: int = 24
    n_prompts: int = 2000             # fresh train-split prompts (steps x batch are drawn from them)
    n_eval: int = 200                 # held-out prompts (probes) for accuracy and the win rate
    probe_every: int = 10
    dir: str = "rl"                   # subfolder of the run dir (another name: a second set of runs beside)


def score_template(path: Path) -> Path:
    """Direct scoring in the world's judge phrase (the format M1 learnt to grade in), forced to "Score:"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"preamble": "Judge the answer.", "ending": "Score:",
                                "sample": JUDGE_TEMPLATE.replace("{instruction}", "{context}")}))
    return path


def rl_stage(run_dir: Path, m1: Path, rm: Path, avoid: set[str], seed: int, kinds, rc: WorldRLConfig,
             threads: int, nproc: int, engine=None) -> dict:
    """train/rl.py from M1 for each source -> {"rows", "sync_share", "runs"}. `engine`: the world's
    EngineConfig (device, dtype, ...); the RL sampler decodes at most 128 sequences together."""
    import dataclasses
    from selfreward.cli import launch
    from selfreward.infer.config import EngineConfig
    from selfreward.records import write_jsonl
    from selfreward.recipes.world.data import loop_prompts
    from selfreward.recipes.world.tasks import heldout_eval_set
    from selfreward.train.rl import RLConfig, train
    from selfreward.recipes.world.demo import check_run_folder
    home = run_dir / rc.dir
    check_run_folder(home, rc, "rl_settings.json")   # a finished source's run is reused as it is
    prompts = write_jsonl(home / "prompts.jsonl", loop_prompts(rc.n_prompts, 70_000 + seed, avoid, kinds))
    probes = write_jsonl(home / "probes.jsonl", [{"prompt": t.prompt} for t in
                                                 heldout_eval_set(rc.n_eval, seed=1234 + seed, kinds=kinds)])
    runs = {}
    for src in rc.sources:
        out = home / src
        cfg = RLConfig(model=str(m1), data=[str(prompts)], output=str(out), reward=src,
                       reward_model=str(rm) if src == "rm" else "",
                       reward_template=str(score_template(home / "score_template.json")) if src == "direct" else "",
                       estimator=rc.estimator, num_samples=rc.num_samples, max_steps=rc.steps, batch_size=rc.batch,
                       lr=rc.lr, final_lr=rc.lr / 10, warmup_steps=0, beta=rc.beta, temperature=rc.temperature,
                       max_new_tokens=rc.max_tokens, probe_data=str(probes), probe_every=rc.probe_every,
                       seed=seed, resume=True, log_every=10, threads=threads,
                       engine=dataclasses.replace(engine or EngineConfig(), max_num_seqs=128))
        if not (out / "model" / "config.json").exists():
            print(f"[rlaif] RL from M1 against {src}: {rc.steps} steps of {rc.batch} prompts x {rc.num_samples}",
                  flush=True)
            launch(train, cfg, "selfreward.train.rl", nproc, out / "rl_config.json")
        runs[src] = read_run(out, probes)
    return summarize(runs)


def read_run(out: Path, probes: Path) -> dict:
    from selfreward.records import read_jsonl
    from selfreward.recipes.world.checker import check
    tasks = [r["prompt"] for r in read_jsonl(probes)]
    curve, per_prompt = [], {}
    for row in read_jsonl(out / "probes.jsonl"):
        ok = [check(p, x) == 1.0 for p, x in zip(tasks, row["texts"], strict=True)]
        per_prompt[row["step"]] = ok
        curve.append({"step": row["step"], "greedy_acc": sum(ok) / len(ok)})
    metrics = [r for r in read_jsonl(out / "metrics.jsonl")]
    return {"curve": curve, "first": per_prompt[min(per_prompt)], "final": per_prompt[max(per_prompt)],
            "metrics": metrics, "model": str(out / "model")}


def win_rate(a: list[bool], b: list[bool]) -> float:
    """a against b, prompt by prompt, by the checker: win 1, loss 0, tie (equal verdicts) 0.5."""
    return sum(1.0 if x and not y else 0.0 if y and not x else 0.5 for x, y in zip(a, b, strict=True)) / len(a)


def summarize(runs: dict) -> dict:
    sft = next(iter(runs.values()))["first"]
    rows = [{"model": "SFT (M1)", "greedy_acc": sum(sft) / len(sft), "win_rate_vs_sft": 0.5}]
    sync, step = 0.0, 0.0
    for src, r in runs.items():
        assert r["first"] == sft, "every RL run starts from the same M1"
        m = r["metrics"]
        sync += sum(x["sync_s"] for x in m)
        step += sum(x["step_s"] for x in m)
        gain, se = paired_diff(r["final"], sft)
        rows.append({"model": f"RL-{src}", "greedy_acc": sum(r["final"]) / len(r["final"]),
                     "gain_vs_sft": gain, "gain_se": se, "win_rate_vs_sft": win_rate(r["final"], sft),
                     "reward_first": m[0]["reward_mean"],
                     "reward_last": m[-1]["reward_mean"], "kl_last": m[-1]["kl"],
                     "sync_share": sum(x["sync_share"] for x in m) / len(m),
                     "sync_ms": 1e3 * sum(x["sync_s"] for x in m) / len(m),
                     "step_s": sum(x["step_s"] for x in m) / len(m),
                     "sample_tokens_per_s": sum(x["sample_tokens_per_s"] for x in m) / len(m), "steps": len(m)})
    return {"rows": rows, "sync_share": sync / step if step else None,
            "curves": {src: {"greedy_acc": r["curve"], "reward_mean": [x["reward_mean"] for x in r["metrics"]],
                             "kl": [x["kl"] for x in r["metrics"]]} for src, r in runs.items()}}


def plot(rl: dict, path: Path) -> Path | None:
    """Held-out greedy accuracy per probe step (left) and the mean reward per step (right), per source."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for src, c in rl["curves"].items():
        axes[0].plot([p["step"] for p in c["greedy_acc"]], [p["greedy_acc"] for p in c["greedy_acc"]], marker="o",
                     label=f"RL-{src}")
        axes[1].plot(range(1, len(c["reward_mean"]) + 1), c["reward_mean"], label=f"RL-{src}")
    axes[0].set_title("held-out greedy accuracy (checker)")
    axes[1].set_title("mean reward of the samples (own scale per source)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rl: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | greedy acc | minus SFT (paired SE) | win rate vs SFT | reward first -> last | KL last | "
             "sync share |", "|---|---|---|---|---|---|---|"]
    for r in rl["rows"]:
        gain = f"{r['gain_vs_sft']:+.3f} ({r['gain_se']:.3f})" if "gain_vs_sft" in r else "-"
        lines.append(f"| {r['model']} | {f(r['greedy_acc'])} | {gain} | {f(r['win_rate_vs_sft'])} | "
                     f"{f(r.get('reward_first'))} -> {f(r.get('reward_last'))} | {f(r.get('kl_last'))} | "
                     f"{f(r.get('sync_share'))} |")
    return "\n".join(lines + [f"weight hand-off share of step time (all runs): {f(rl['sync_share'])}"])
