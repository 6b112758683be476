"""Checkpoint selection (PAPER_NOTES section 1; recipes/README.md, "Checkpoint selection"): of the exports a
DPO run wrote (`train/dpo.py --export-every N`), keep the one that wins most often head-to-head against the
iteration's starting model M_t (most wins, then fewest losses, then the later one), copied to --out.

    python -m selfreward.recipes.select --candidates RUN/iter_1/dpo/exports/step_* --reference M1 \
        --judge M1 --prompts heldout.jsonl --out RUN/iter_1/model --report RUN/iter_1/select.json
    python -m selfreward.recipes.select ... --judge JUDGE --judge-url http://host:8000   # `vllm serve JUDGE` there
"""

import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig
from selfreward.model.checkpoint import write_folder
from selfreward.provenance import made_by, same_file
from selfreward.records import DataError, read_json, write_json
from selfreward.recipes.h2h import H2HConfig, generate_responses, head_to_head, read_prompts
from selfreward.recipes.pipeline import claimed
from selfreward.recipes.session import Session


@dataclass
class SelectConfig(H2HConfig):
    judge: str = cli.checkpoint("")   # the judging checkpoint; "" = the reference (as the self-judging loop)
    # the judge alone on OpenAI-compatible server(s) URL[,URL...] serving --judge (checked); the replies stay on
    # the engine flags' engine; "" = the judge there too
    judge_url: str = ""
    candidates: list[str] = cli.checkpoint([])   # checkpoint folders, in training order
    reference: str = cli.checkpoint("")          # M_t, the iteration's starting model
    out: str = cli.passive("")        # folder that receives a copy of the chosen checkpoint ("" = none)
    report: str = cli.passive("")     # JSON file for the choice and every candidate's scores ("" = none)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def check_judge_url(self, prefix: str = "--") -> None:
        """A judge server needs the judge's path: the server is checked to serve it (`prefix`: the loop's --select-)."""
        if self.judge_url and not self.judge:
            raise cli.ConfigError(f"{prefix}judge-url needs {prefix}judge: the checkpoint that server serves "
                                  f"(its /v1/models root is checked against it)")


def pick(scores: list[dict]) -> int:
    """Index of the chosen candidate: most wins, then fewest losses, then the later one."""
    return max(range(len(scores)), key=lambda i: (scores[i]["wins"], -scores[i]["losses"], i))


def check_models(candidates: list[str], reference: str, judge_model: str) -> None:
    if not candidates:
        raise DataError("select: no candidate checkpoints")
    for c in [reference, judge_model, *candidates]:
        if not (Path(c) / "config.json").exists():
            raise DataError(f"{c}: not a checkpoint folder (no config.json)")


def select_checkpoint(candidates: list[str], reference: str, prompts: list[str], judge_model: str,
                      out: str | Path | None = None, cfg: SelectConfig | None = None, prefix: str = "--") -> dict:
    """Judge each candidate against `reference` on `prompts` (recipes.h2h.head_to_head), choose by `pick`,
    copy the chosen folder to `out`. `cfg`: the answering and judging settings (its paths are not read; its
    judge_url is: the judge on that server, named `prefix`judge-url in errors).
    Returns {"chosen", "chosen_index", "rule", "reference", "judge", "n_prompts", "scores": per candidate}."""
    cfg = cfg or SelectConfig()
    if not prompts:
        raise DataError("select: no prompts to judge on")
    check_models(candidates, reference, judge_model)
    session = Session(cfg.engine)             # one model in memory at a time
    ref, *cand = [generate_responses(*session.get(str(m)), prompts, cfg, progress=True)
                  for m in [reference, *candidates]]
    jeng, jtok = session.get(str(judge_model), cfg.judge_url, f"{prefix}judge-url")
    scores = []
    for c, resp in zip(candidates, cand):
        r = head_to_head(jeng, jtok, prompts, resp, ref, cfg, progress=True)
        wins, ties, losses = (sum(x["outcome"] == k for x in r["records"]) for k in ("win", "tie", "loss"))
        scores.append({"candidate": str(c), "wins": wins, "ties": ties, "losses": losses, "win": r["win"],
                       "tie": r["tie"], "loss": r["loss"], "no_verdict": r["no_verdict"]})
        print(f"[select] {c}: {wins} wins, {ties} ties, {losses} losses of {r['n']} against {reference}", flush=True)
    session.release()
    i = pick(scores)
    res = {"chosen": str(candidates[i]), "chosen_index": i, "reference": str(reference), "judge": str(judge_model),
           **({"judge_url": cfg.judge_url} if cfg.judge_url else {}), "n_prompts": len(prompts),
           "rule": "most wins, then fewest losses, then the later candidate", "scores": scores}
    if out:
        _copy(candidates[i], out)
        res["out"] = str(out)
    return res


def _copy(src: str | Path, out: str | Path) -> None:
    """The chosen checkpoint folder's files copied to `out`, atomically."""
    files = [p for p in Path(src).iterdir() if p.is_file()]
    write_folder(Path(out), lambda tmp: [shutil.copy2(p, tmp / p.name) for p in files])


def select_from_run(run: Path, reference: str, cfg: SelectConfig, out: Path, report: Path) -> dict:
    """The loop's selection: a DPO run's exports (RUN/exports/step_N, in step order) and its final export
    (RUN/final) judged against `reference` (M_t) on `cfg.prompts`; the winner copied to `out`, the result
    in `report` (done once: a rerun reads the report). With a single candidate (fewer steps than one export
    interval) there is nothing to choose: the final export is copied without judging."""
    if report.exists() and (out / "config.json").exists():
        return read_json(report)
    steps = sorted((run / "exports").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    cands = [str(p) for p in steps] + [str(run / "final")]
    if len(cands) == 1:
        _copy(cands[0], out)
        res = {"chosen": cands[0], "chosen_index": 0, "scores": [], "rule": "one candidate: no judging"}
    else:
        res = select_checkpoint(cands, reference, read_prompts(cfg.prompts, cfg.limit), cfg.judge or reference, out,
                                cfg, "--select-")
    write_json(report, res)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(SelectConfig, __doc__)
    p.add_argument("--overwrite", action="store_true", help="replace an --out or --report that select did not "
                   "write, or wrote from other inputs or settings")
    ns = p.parse_args(argv)
    cfg = cli.build(SelectConfig, ns)
    for name in ("reference", "prompts"):
        if not getattr(cfg, name):
            raise cli.ConfigError(f"--{name} is required")
    cfg.check_judge_url()
    # --out / --report never an input: not a model, the prompts or the template, nor (--out) a folder holding
    # one (the chosen copy replaces the folder whole)
    ins = [("--reference", cfg.reference), ("--judge", cfg.judge), ("--prompts", cfg.prompts),
           ("--pair-template", cfg.pair_template)] + [("--candidates", c) for c in cfg.candidates]
    for oflag, o in (("--out", cfg.out), ("--report", cfg.report)):
        for iflag, i in ins:
            if o and i and (same_file(i, o) or Path(i).resolve().is_relative_to(Path(o).resolve())):
                raise cli.ConfigError(f"{oflag} {o}: is {iflag} {i} or holds it; refusing to write over an input")
    prompts = read_prompts(cfg.prompts, cfg.limit)
    check_models(cfg.candidates, cfg.reference, cfg.judge or cfg.reference)
    made = made_by(cfg)          # every model, the prompts and the template by content; the settings
    with ExitStack() as stack:   # each output locked, checked and recorded (OUT.meta.json) before the work
        for out in filter(None, (cfg.out, cfg.report)):
            stack.enter_context(claimed(out, made, [i for _, i in ins if i], ns.overwrite, adopt=False))
        res = select_checkpoint(cfg.candidates, cfg.reference, prompts, cfg.judge or cfg.reference, cfg.out, cfg)
        if cfg.report:
            write_json(cfg.report, res)
    print(f"[select] chosen: {res['chosen']} ({res['rule']})" + (f" -> {cfg.out}" if cfg.out else ""))
    return res


if __name__ == "__main__":
    cli.run_main(main)
