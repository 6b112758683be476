"""The real demo (issue 29): a real instruct checkpoint as M0 (SmolLM2-135M-Instruct, converted by
`python -m selfreward.model.gguf`), OASST prompts with IFEval's verifiable instructions (recipes.verifiable), and
each method from M0 measured by if-verifiable's strict prompt-level accuracy on the held-out items.

    python -m selfreward.recipes.real_demo --model M0_DIR [--oasst trees.jsonl] [--run-dir runs/real]
    python -m selfreward.recipes.real_demo --model M0_DIR --smoke      # every stage at tiny sizes (CI)
    bash scripts/demo.sh --real                                         # install, convert SmolLM2 once, run this

Rows: M0 (greedy); RL-checker (train/rl.py, --reward ifeval); DPO-oracle (M0's N candidates ranked by the checker,
best vs worst, train/dpo.py); self-rewarding (one iteration of recipes.self_reward, M0 its own judge). Also: the
self-judge's parse rate and its agreement with the checker on the pairs it built; RLAIF part 1, M0's soft labels
on checker-known pairs (agreement, position bias). RUN/manifest.json keeps every finished stage (a rerun skips
it), RUN/summary.json the rows, RUN/accuracy.png the plot (with matplotlib). recipes/README.md, "The real demo".
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli, progress
from selfreward.infer.config import EngineConfig
from selfreward.recipes import pipeline, real_rows, verifiable
from selfreward.records import DataError, read_json, read_jsonl, write_json

SHARED_OASST = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasst_en_100_trees.jsonl"
ROWS = ("M0", "RL-checker", "DPO-oracle", "self-rewarding", "self-rewarding (instructions rubric)")


@dataclass
class RealConfig:
    model: str = cli.checkpoint("")   # M0: an HF folder (model/gguf.py's output)
    oasst: str = cli.input_file("")   # OASST trees; "" = ../shared/data/oasst_en_100_trees.jsonl beside the checkout
    run_dir: str = cli.passive("runs/real")
    seed: int = 0                     # the split, the instruction draws, sampling and training
    eval_frac: float = 0.25           # share of the OASST trees held out (recipes.verifiable)
    n_eval: int = 300                 # held-out items measured (>= 1)
    n_prompts: int = 0                # training items (0 = all)
    train_draws: int = 2              # instruction draws per training prompt (recipes.verifiable --train-draws)
    self_instruct: int = 32           # training requests M0 writes by the loop's self-instruct step (0 = none)
    max_tokens: int = 256             # tokens per reply: the measure, the candidates, the RL samples
    max_length: int = 2048            # tokens per training example; prompts that leave no room for a reply are left out
    temperature: float = 0.7          # the candidates' and the RL samples' (> 0)
    top_p: float = 0.9
    rl_steps: int = 40                # RL-checker's optimizer steps; 0 = no RL row
    rl_batch: int = 8                 # prompts per RL step
    rl_micro_batch: int = 2           # prompts per forward (with their replies); the step accumulates the rest
    rl_num_samples: int = 4           # replies per prompt (RLOO; 1 = REINFORCE with a value baseline)
    rl_lr: float = 5e-5
    rl_beta: float = 0.05             # KL penalty to M0
    rl_reward: str = cli.choice("ifeval-partial", "ifeval")   # the share of the instructions followed, or strict
    n_candidates: int = 4             # candidates per training prompt (the oracle's and the loop's; >= 2)
    dpo_steps: int = 30               # DPO steps of the DPO-oracle and self-rewarding rows; 0 = pairs only, no rows
    dpo_batch: int = 4                # pairs per DPO step
    dpo_lr: float = 5e-6
    dpo_beta: float = 0.1
    judge_k: int = 1                  # M0's judgments per candidate (the self-rewarding row)
    judge_max_tokens: int = 64
    judge_template: str = "default"   # the paper's additive 5-point rubric (recipes.judge), or a rubric file
    # the second self-rewarding row's rubric: recipes.judge's "instructions" (each of the request's instructions
    # followed?), or a rubric file; "" = no second row
    judge2_template: str = "instructions"
    # what the self-judge's pairs rank by: expected (the expected score from the digits after "Score:", every
    # candidate scored) or sampled (the mean parsed score of K judgments: the paper's)
    score_from: str = cli.choice("expected", "sampled")
    # Meta-Rewarding in the self-rewarding rows (recipes.self_reward --meta-judge; needs --judge-k >= 2: the
    # meta-judge compares a reply's distinct judgments) and its length control of the actor's pairs
    meta_judge: bool = False
    length_control: float = 0.0
    label_limit: int = 100            # checker-known pairs M0 labels (RLAIF part 1); 0 = all the oracle's pairs
    table4_limit: int = 0             # held-out OASST reply groups judged for Table 4 (0 = all)
    threads: int = cli.passive(0)     # torch threads (0 = leave as is)
    cpu_bf16: bool = False            # the trainers' forward in bf16 on the CPU (train --cpu-bf16; AMX CPUs)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def check(self) -> None:
        """The rules the ranges do not hold (ranges.py holds the rest), before any file is touched."""
        rules = (("--n-eval", self.n_eval < 1, ">= 1"), ("--n-candidates", self.n_candidates < 2, ">= 2 (a pair)"),
                 ("--temperature", self.temperature <= 0, "> 0 (RL samples)"),
                 ("--max-length", self.max_length <= self.max_tokens, "above --max-tokens"),
                 ("--rl-micro-batch", self.rl_batch % self.rl_micro_batch, "a divisor of --rl-batch"),
                 ("--judge-k", self.meta_judge and self.judge_k < 2, ">= 2 with --meta-judge (judgments to compare)"),
                 ("--length-control", not 0.0 <= self.length_control < 1.0, "in [0, 1) (a share of the score range)"))
        for flag, bad, want in rules:
            if bad:
                raise cli.ConfigError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))}: must be {want}")

# every size small: a tiny model runs all the stages in seconds (tests/test_real_demo.py)
SMOKE = dict(n_eval=6, n_prompts=16, max_tokens=24, rl_steps=2, rl_batch=2, rl_micro_batch=1, rl_num_samples=2,
             rl_lr=1e-4, n_candidates=6, dpo_steps=2, dpo_batch=2, dpo_lr=1e-4, judge_k=1, judge_max_tokens=8,
             label_limit=4, table4_limit=3, self_instruct=4)


def once(key: str, what: str, fn):
    """A stage that runs fn(cfg, session, run) once: its result goes to RUN/manifest.json under `key`, and a
    rerun finds it there and skips the work. fn -> None: nothing to record (the row is off)."""
    def stage(cfg, t, s, *_):
        done = read_json(Path(cfg.run_dir) / "manifest.json")
        if key in done:
            print(f"[real] {key}: done earlier, skipped", flush=True)
            return {key: done[key]}
        print(f"\n[real {time.strftime('%H:%M:%S')}] {key}: {what}", flush=True)
        t0 = time.perf_counter()
        got = fn(cfg, s, Path(cfg.run_dir))
        return {} if got is None else {key: got | {"seconds": round(time.perf_counter() - t0, 1)}}
    return pipeline.Stage(key, stage, timed=False)


def heldout(run: Path) -> list[dict]:
    return read_jsonl(run / "sets" / "heldout.jsonl")


def by_id(run: Path) -> dict[str, dict]:
    return {str(r["id"]): r for r in read_jsonl(run / "sets" / "train.jsonl")}


def oracle(cfg, s, run: Path) -> dict:
    lc = real_rows.loop_config(cfg, run / "oracle", score_from="sampled")
    recs = by_id(run)
    stats = real_rows.iteration(lc, s, lambda cands: real_rows.checker_judgments(recs, cands))
    return real_rows.trained_row(lc, s, stats, heldout(run), cfg.max_tokens, run / "replies" / "oracle.jsonl")


def self_rewarding(cfg, s, run: Path, name: str, template: str) -> dict | None:
    """One iteration of the loop in RUN/`name`, M0 judging its own candidates (the oracle's, copied) under
    `template` ("": no row) -> its row, the judge's parse rate and its agreement with the checker on its pairs."""
    if not template:
        return None
    lc = real_rows.loop_config(dataclasses.replace(cfg, judge_template=template), run / name)
    stats = real_rows.iteration(lc, s, copy_from=run / "oracle")
    it = pipeline.folder(lc, 1)
    judged = read_jsonl(it / "judgments.jsonl")
    parsed = sum(j["score"] is not None for j in judged)
    row = real_rows.trained_row(lc, s, stats, heldout(run), cfg.max_tokens, run / "replies" / f"{name}.jsonl")
    return row | {"judge_template": template, "judgments": len(judged),
                  "judge_parse_rate": parsed / len(judged) if judged else None} | \
        real_rows.judge_agreement(by_id(run), read_jsonl(it / "pairs.jsonl"))


def labels(cfg, s, run: Path) -> dict:
    pairs = read_jsonl(run / "oracle" / "iter_1" / "pairs.jsonl")
    return real_rows.label_row(cfg, s, pairs, run / "labels.jsonl")


def write_manifest(cfg, t: int, timings: dict, stats: dict) -> dict:
    path = Path(cfg.run_dir) / "manifest.json"
    m = read_json(path) | stats
    write_json(path, m)
    return m


RECIPE = pipeline.Recipe("selfreward.recipes.real_demo", RealConfig, head=(
    once("sets", "OASST first turns with verifiable instructions (recipes.verifiable)",
         lambda c, s, run: real_rows.make_sets(c, run, s)),
    once("M0", "greedy replies to the held-out items, checked by if-verifiable",
         lambda c, s, run: real_rows.measure(s, c.model, heldout(run), c.max_tokens, run / "replies" / "m0.jsonl")),
    once("RL-checker", "train/rl.py from M0, the checker as the reward",
         lambda c, s, run: real_rows.rl_row(c, run, s, heldout(run)) if c.rl_steps else None),
    once("DPO-oracle", "M0's candidates ranked by the checker, best vs worst pairs, train/dpo.py", oracle),
    once("self-rewarding", "one iteration of the loop, M0 judging its own candidates (--judge-template)",
         lambda c, s, run: self_rewarding(c, s, run, "loop", c.judge_template)),
    once("rlaif_labels", "M0's soft labels on checker-known pairs", labels),
    once("table4", "M0 and the self-rewarding row's model judging the held-out OASST groups (Table 4)",
         lambda c, s, run: real_rows.table4(c, s, run, {"M0": c.model, "self-rewarding": str(
             pipeline.folder(real_rows.loop_config(c, run / "loop"), 1) / "model")})),
    once("self-rewarding (instructions rubric)", "the same, M0 judging under --judge2-template",
         lambda c, s, run: self_rewarding(c, s, run, "loop2", c.judge2_template))),
    body=(), manifest=write_manifest,
    layout=("sets", "instruct", "replies", "rl", "oracle", "loop", "loop2", "labels.jsonl", "manifest.json", "summary.json", "accuracy.png"))

COLUMNS = [("model", "model", "{}"), ("accuracy", "strict acc", "{:.3f}"), ("se", "SE", "{:.3f}"), ("n", "n", "{}"), ("instruction_accuracy", "instr acc", "{:.3f}"), ("vs_M0", "vs M0", "{:+.3f}"),
           ("paired_se", "paired SE", "{:.3f}"),
           ("pairs", "pairs", "{}"), ("judge_parse_rate", "judge parsed", "{:.2f}"),
           ("judge_agree", "judge agrees", "{:.2f}"), ("mean_reply_chars", "reply chars", "{:.0f}"),
           ("seconds", "s", "{:.0f}")]


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[real] matplotlib is not installed: no plot (summary.json holds the figures)", flush=True)
        return None
    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows], yerr=[r["se"] for r in rows], capsize=4)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_ylabel("strict prompt-level accuracy (+- 1 SE)")
    ax.set_title(f"IFEval instructions on {rows[0]['n']} held-out OASST items (if-verifiable)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(cfg: RealConfig, m: dict, wall: float) -> dict:
    """The terminal table, RUN/summary.json and RUN/accuracy.png from the manifest."""
    run = Path(cfg.run_dir)
    rows = [{"model": k, **m[k]} for k in ROWS if k in m]
    base = m.get("M0", {}).get("replies")
    rows = [r | (real_rows.paired(base, r["replies"]) if base and r.get("replies") and r["model"] != "M0" else {})
            for r in rows]
    print("\n" + progress.table(rows, COLUMNS), flush=True)
    lab = m.get("rlaif_labels", {})
    if lab.get("pairs"):
        print(f"[real] RLAIF soft labels by M0 on {lab['pairs']} checker-known pairs: agreement "
              f"{lab['agreement_both_orders']:.3f} (both orders), {lab['agreement_one_order']:.3f} (one order); "
              f"prefers the first shown {lab['position_bias']['one_order']:.3f}", flush=True)
    t4 = {k: v for k, v in m.get("table4", {}).items() if isinstance(v, dict)}
    f = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    for name, r in t4.items():
        print(f"[real] Table 4, {name} judging {r['groups']} held-out OASST groups ({r['replies']} replies, "
              f"{r['parse_failures']} judgments unparsed): " + "; ".join(
                  f"{how} pairwise {f(r[how]['pairwise_accuracy'])}, spearman {f(r[how]['spearman'])}"
                  for how in ("sampled", "expected")), flush=True)
    png = plot(rows, run / "accuracy.png")
    summary = {"rows": rows, "sets": m.get("sets"), "rlaif_labels": lab, "table4": t4, "wall_seconds": round(wall, 1),
               "plot": str(png) if png else None, "config": cli.to_dict(cfg)}
    print(f"[real] summary: {write_json(run / 'summary.json', summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(RealConfig, __doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every stage at tiny sizes (CI; flags given still win)")
    p.add_argument("--overwrite", action="store_true", help="RUN was made with other settings: start it over")
    a = p.parse_args(argv)
    cfg = cli.build(RealConfig, a)
    if a.smoke:
        given = {k for k in a._cfg_dests if getattr(a, k) is not None}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in SMOKE.items() if k not in given})
    cfg.check()
    if not (Path(cfg.model) / "config.json").is_file():
        raise DataError(f"{cfg.model or '(no --model)'}: not a checkpoint folder (--model: one with config.json)")
    if not cfg.oasst:
        if not SHARED_OASST.is_file():
            raise cli.ConfigError(f"--oasst is required ({SHARED_OASST} is absent)")
        cfg = dataclasses.replace(cfg, oasst=str(SHARED_OASST))
    if not Path(cfg.oasst).is_file():
        raise DataError(f"--oasst {cfg.oasst}: no such file")
    verifiable.registry()                       # if-verifiable installed, before any work
    real_rows.loop_config(cfg, Path(cfg.run_dir) / "loop")   # the loop's own checks, the rubric loaded
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    m = pipeline.run(RECIPE, cfg, overwrite=a.overwrite)[0]
    return report(cfg, m, time.perf_counter() - t0)


if __name__ == "__main__":
    cli.run_main(main)
