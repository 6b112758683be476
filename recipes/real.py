"""The self-rewarding loop on a real checkpoint and Open Assistant seed data.

    python -m selfreward.recipes.real --model M0_DIR --oasst-seed data/seed --run-dir runs/real --nproc 8
    python -m selfreward.recipes.world.demo --real-model M0_DIR --oasst-seed data/seed   # the same, more flags

`--oasst-seed` is the folder `python -m selfreward.recipes.oasst --out` writes: ift.jsonl (prompts and best replies),
eft_train.jsonl (judge examples, when built with --eft-model) and groups_eval.jsonl (held-out human-ranked
replies). M1 = train/sft.py on IFT (+ EFT); M2, M3 = recipes.self_reward with self-instruct prompts and the
default additive rubric. There is no checker here: after each model the report holds the judge's agreement
with the human ranks (recipes.evaluate.rm_eval on groups_eval.jsonl) and the loop's counts.
"""

import dataclasses
import time
from pathlib import Path

from selfreward import cli

COLUMNS = [("model", "model", "{}"), ("judge_pairwise", "judge pw", "{:.3f}"), ("judge_spearman", "spearman", "{:.3f}"),
           ("judge_parse_failures", "j.unparsed", "{}"), ("mean_len_tokens", "len tok", "{:.1f}"),
           ("pairs", "pairs", "{}"), ("ties", "ties", "{}"), ("parse_failures", "unparsed", "{}")]


def run_real(model: str, seed_dir: str, run_dir: str, iterations: int = 2, n_prompts: int = 1000,
             nproc: int = 1, seed: int = 0, n_eval_groups: int = 200, loop: dict | None = None,
             sft_steps: int = 0) -> dict:
    """`loop`: nested LoopConfig values to override ({"candidates": {"n": 4}, "judge": {"k": 3}, "dpo":
    {"lr": 1e-6}, "min_margin": 1, ...}); `sft_steps`: M1's SFT steps (0: train/sft.py's default epochs)."""
    from selfreward.recipes.evaluate import load_groups, rm_eval
    from selfreward.recipes.self_reward import LoopConfig, run_loop
    from selfreward.recipes.session import Session
    from selfreward.progress import table
    from selfreward.records import write_json
    from selfreward.train.sft import SFTConfig, train

    t0 = time.perf_counter()
    seed_dir, run = Path(seed_dir), Path(run_dir)
    ift, eft, groups = seed_dir / "ift.jsonl", seed_dir / "eft_train.jsonl", seed_dir / "groups_eval.jsonl"
    if not ift.exists():
        raise cli.ConfigError(f"{ift}: missing (make it with python -m selfreward.recipes.oasst --input OASST --out {seed_dir})")
    m1 = run / "m1"
    if not (m1 / "config.json").exists():
        data = [str(ift)] + ([str(eft)] if eft.exists() else [])
        scfg = SFTConfig(model=model, data=data, output=str(run / "sft"), export=str(m1), lr=5.5e-6,
                         final_lr=1.1e-6, batch_size=16, resume=True, seed=seed, max_steps=sft_steps)
        cli.launch(train, scfg, "selfreward.train.sft", nproc, run / "sft_config.json")
    # checkpoint selection on by default, as the paper: an export every 200 DPO steps, the winner against M_t
    # on held-out prompts (the held-out groups' prompts, at most 253 as the paper's validation set)
    sel = {"select_every": 200, "select": {"prompts": str(groups), "limit": 253}} if groups.exists() else {}
    lc = cli.from_dict(LoopConfig, {"run_dir": str(run / "loop"), "init_model": str(m1), "iterations": iterations,
                                    "seed_prompts": str(ift), "n_prompts": n_prompts, "nproc": nproc, "seed": seed,
                                    **sel, **(loop or {})})
    jc = dataclasses.replace(lc.judge, seed=seed)
    eval_groups = load_groups(groups)[:n_eval_groups] if groups.exists() else []

    def hook(t: int, model_dir: str) -> dict:
        if not eval_groups:
            return {}
        r = rm_eval(*Session(lc.engine).get(model_dir), eval_groups, jc)
        s = r["sampled"]
        return {"judge_pairwise": s["pairwise_accuracy"], "judge_five_best": s["five_best"],
                "judge_exact_match": s["exact_match"], "judge_spearman": s["spearman"],
                "judge_kendall_tau": s["kendall_tau"], "judge_parse_failures": r["parse_failures"]}

    lc.eval_hook = hook
    manifests = run_loop(lc)
    ev = {k: v for m in manifests for k, v in m.get("eval", {}).items()}
    rows = []
    for i in range(1, iterations + 2):
        row = {"model": f"M{i}", **ev.get(f"M{i}", {})}
        if i <= len(manifests):
            c = manifests[i - 1]["counts"]
            row.update(pairs=c["pairs"], ties=c["ties"], parse_failures=c["parse_failures"])
            row["mean_len_tokens"] = manifests[i - 1]["mean_len"]["candidate_tokens"]
        rows.append(row)
    print("\n" + table(rows, COLUMNS), flush=True)
    summary = {"rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1), "mode": "real",
               "model": model, "seed_dir": str(seed_dir), "pairs_files": [str(run / "loop" / f"iter_{t}" / "pairs.jsonl")
                                                                          for t in range(1, iterations + 1)]}
    write_json(run / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    import argparse
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="M0: a Llama-family HF checkpoint folder")
    ap.add_argument("--oasst-seed", required=True, help="the folder `python -m selfreward.recipes.oasst --out` wrote")
    ap.add_argument("--run-dir", default="runs/real")
    for flag, default in (("iterations", 2), ("n-prompts", 1000), ("nproc", 1), ("seed", 0), ("n-eval-groups", 200),
                          ("sft-steps", 0)):
        ap.add_argument(f"--{flag}", type=int, default=default, help=f"(default: {default})")
    a = ap.parse_args(argv)
    return run_real(a.model, a.oasst_seed, a.run_dir, a.iterations, a.n_prompts, a.nproc, a.seed, a.n_eval_groups,
                    sft_steps=a.sft_steps)


if __name__ == "__main__":
    cli.run_main(main)
