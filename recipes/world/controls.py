"""The loop's controls: the same iterations as the self-rewarding loop with another source of preferences.

- oracle: every candidate is scored by the checker (5 right, 1 wrong), so every pair is right over wrong:
  what the loop's sampler, pairs and DPO reach when the preferences are perfect (the bound);
- fixed: every iteration is judged by M1 (the judge does not improve): the paper's claim is that an
  improving judge matters, and this row tests it against the self-judged M_t;
- meta-oracle: the self-rewarding loop with Meta-Rewarding's judge pairs (recipes/meta_judge.py), the verdicts
  on M_t's judgments given by the world's reference meta-judgment (recipes/world/meta.py) instead of M_t: what
  judge pairs can do for the judge when the meta-judge is right (the bound of the meta-rewarding rows).

Each control runs in RUN/controls/<name>/iter_t/ with the loop's own stages (recipes.self_reward: prompts,
candidates, pairs, DPO) and its settings; only the judgments file is written here. Files that would be
byte-identical to the self-rewarding loop's are copied from it instead of recomputed (the same model, the
same seeds): the oracle's iteration-1 prompts and candidates (M1's), and the fixed judge's whole iteration 1
(M1 judging M1 is the self-judged iteration 1) and its iteration-2 prompts and candidates (M2's).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from selfreward.recipes.judge import judge_items
from selfreward.recipes.pairs import distinct_candidates
from selfreward.recipes.pipeline import run_stage, seed
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import RECIPE, write_manifest
from selfreward.recipes.session import Session
from selfreward.recipes.world.checker import is_correct, parse_prompt
from selfreward.recipes.world.judging import judgment
from selfreward.records import read_jsonl, write_jsonl

CONTROLS = ("oracle", "fixed", "meta-oracle")


def checker_judgments(prompts: dict[str, str], cands: list[dict]) -> list[dict]:
    """One judgment per distinct candidate text: the reference judgment (judging.judgment, what the EFT seed
    teaches), score 5 when the checker finds the text right, else 1."""
    out = []
    for c in distinct_candidates(cands):
        task = parse_prompt(prompts[c["id"]])
        out.append({"id": c["id"], "sample": c["sample"], "k": 0, "judgment": judgment(task, c["text"]),
                    "score": 5.0 if is_correct(task, c["text"]) else 1.0, "prompt_cut": False})
    return out


def fixed_judgments(judge_model: str, prompts: dict[str, str], cands: list[dict], lc, t: int, s: Session
                    ) -> list[dict]:
    """The loop's judge stage with `judge_model` in place of M_t (same template, K, sampling, seeds)."""
    engine, tok = s.get(judge_model)
    cands = distinct_candidates(cands) if lc.judge.distinct else cands
    jc, base = lc.judging(), seed(lc, t, 2)
    res = judge_items(engine, tok, [(prompts[c["id"]], c["text"]) for c in cands], jc,
                      [base + i * jc.k for i in range(len(cands))], progress=True)
    return [{"id": c["id"], "sample": c["sample"], "k": k, "judgment": x, "score": sc, "prompt_cut": r.prompt_cut}
            for c, r in zip(cands, res) for k, (x, sc) in enumerate(r.samples)]


def checker_meta_judgments(prompts: dict[str, str], cands: list[dict], judgments: list[dict]) -> list[dict]:
    """Every comparison recipes.meta_judge.meta_units names, its verdict the world's reference meta-judgment
    (recipes/world/meta.py; null where that names neither judgment)."""
    from selfreward.recipes.meta_judge import meta_units
    from selfreward.recipes.world.meta import meta_judgment, reference_verdict
    text = {(c["id"], c["sample"]): c["text"] for c in cands}
    jd = {(j["id"], j["sample"], j["k"]): j["judgment"] for j in judgments}
    out = []
    for u in meta_units(judgments):
        key = (u["id"], u["sample"])
        args = (parse_prompt(prompts[u["id"]]), text[key], jd[(*key, u["a"])], jd[(*key, u["b"])])
        out.append({**u, "meta": meta_judgment(*args) or "", "verdict": reference_verdict(*args), "prompt_cut": False})
    return out


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        if not (dst / n).exists():
            if (src / n).is_dir():
                shutil.copytree(src / n, dst / n)
            else:
                shutil.copy2(src / n, dst / n)


def run_control(name: str, lc, m1: str, evaluate=None) -> list[dict]:
    """The control `name` ("oracle" or "fixed") for lc.iterations iterations from M1 -> its manifests.
    `evaluate(t, model_dir)` is called on each model it trains (M_{t+1} of the control)."""
    if name not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, not {name!r}")
    cfg = dataclasses.replace(lc, run_dir=str(Path(lc.run_dir).parent / "controls" / name), eval_hook=None,
                              meta_judge=name == "meta-oracle")
    s, out = Session(cfg.engine), []
    for t in range(1, cfg.iterations + 1):
        it, own = folder(cfg, t), folder(lc, t)
        timings = {}
        if name == "fixed" and t == 1:             # M1 judging M1: the self-judged iteration 1 itself
            _copy(own, it, ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl", "pairs.jsonl", "model"))
        elif name == "meta-oracle" and t == 1:     # M1's own iteration 1 up to its judgments
            _copy(own, it, ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl"))
        elif (name == "oracle" and t == 1) or (name == "fixed" and t == 2):
            _copy(own, it, ("prompts.jsonl", "candidates.jsonl"))
        for st in ("prompts", "candidates"):
            t0 = time.perf_counter()
            run_stage(RECIPE, cfg, st, t, s)
            timings[st] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
        if name == "meta-oracle":                  # M_t judges, as in the loop
            run_stage(RECIPE, cfg, "judge", t, s)
        elif not (it / "judgments.jsonl").exists():
            cands = read_jsonl(it / "candidates.jsonl")
            recs = checker_judgments(prompts, cands) if name == "oracle" else \
                fixed_judgments(m1, prompts, cands, cfg, t, s)
            write_jsonl(it / "judgments.jsonl", recs)
        if name == "meta-oracle" and not (it / "meta_judgments.jsonl").exists():
            write_jsonl(it / "meta_judgments.jsonl", checker_meta_judgments(
                prompts, read_jsonl(it / "candidates.jsonl"), read_jsonl(it / "judgments.jsonl")))
        timings["judge"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        stats = run_stage(RECIPE, cfg, "pairs", t, s)
        if not stats["counts"]["pairs"]:
            print(f"[control {name}] iter {t}: no pairs (no prompt with a right and a wrong candidate text); "
                  f"the control stops at M{t}", flush=True)
            break
        run_stage(RECIPE, cfg, "dpo", t, s)
        timings["pairs_dpo"] = round(time.perf_counter() - t0, 2)
        m = write_manifest(cfg, t, timings, stats)
        if evaluate is not None:
            m["eval"] = evaluate(t, str(it / "model"))
        out.append(m)
        c = m["counts"]
        print(f"[control {name}] iter {t}: {c['candidates']} candidates, {c['ties']} ties, {c['pairs']} pairs",
              flush=True)
    return out
