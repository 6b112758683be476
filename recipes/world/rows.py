"""The demo's rows: per model its measurement, per iteration the statistics of the files that iteration wrote.

Row names: M0, M1, M2, M3 (the self-rewarding loop: M_t judges its own candidates), `M2-oracle`, `M3-oracle`
(the same iterations from M1 with the checker's preferences, recipes/world/controls.py), `M3-fixed` (the same
iterations with M1 judging every iteration; its M2 is the loop's M2).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from selfreward.recipes.world.checker import check, parse_prompt
from selfreward.recipes.world.report import pair_quality, ranking_on_mixed
from selfreward.records import read_jsonl


def pass_at_n(prompts: dict[str, str], candidates: list[dict]) -> dict:
    """By the checker, over an iteration's prompts: the share with at least one right candidate (pass@N),
    overall and per kind, and the mean accuracy of the candidates."""
    right = defaultdict(list)
    for c in candidates:
        right[c["id"]].append(check(prompts[c["id"]], c["text"]) == 1.0)
    by_kind = defaultdict(list)
    for pid, oks in right.items():
        by_kind[parse_prompt(prompts[pid]).kind].append(any(oks))
    n = max(1, len(right))
    return {"loop_pass_at_n": sum(map(any, right.values())) / n,
            "loop_sample_acc": sum(map(sum, right.values())) / max(1, sum(map(len, right.values()))),
            "loop_pass_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())}}


def self_judge_vs_likelihood(lc, t: int) -> dict:
    """recipes.world.report.ranking_on_mixed on iteration t's files, the likelihood under the model that
    sampled the candidates (M_t of `lc`)."""
    from selfreward.recipes.pipeline import folder
    from selfreward.recipes.self_reward import model_at
    from selfreward.recipes.session import Session

    it = folder(lc, t)
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    engine, tok = Session(lc.engine).get(model_at(lc, t))

    def likelihood(items):
        lps = engine.score([tok.user_ids(p) for p, _ in items], [tok.render_response(x) for _, x in items])
        return [sum(lp) for lp in lps]
    r = ranking_on_mixed(prompts, read_jsonl(it / "candidates.jsonl"), read_jsonl(it / "judgments.jsonl"), likelihood)
    print(f"[world] {Path(lc.run_dir).name} iteration {t}: {r['mixed_prompts']} prompts with right and wrong "
          f"candidates; of their {r['right_wrong_pairs']} (right, wrong) text pairs the judge ranks right higher "
          f"in {_f(r.get('judge_rw'))} and wrong higher in {_f(r.get('judge_wr'))}; the sampler's likelihood: "
          f"{_f(r.get('likelihood_rw'))} / {_f(r.get('likelihood_wr'))}", flush=True)
    return r


def iteration_stats(lc, t: int, manifest: dict, ranking: bool = True) -> dict:
    """The columns of iteration t of the loop (or control) `lc`: pairs, ties, pair quality by the checker,
    pass@N of the candidates, and (with `ranking`) the judge against the likelihood."""
    from selfreward.recipes.pipeline import folder
    it = folder(lc, t)
    c = manifest["counts"]
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    out = {"pairs": c["pairs"], "prompts_paired": c.get("prompts_paired"), "ties": c["ties"],
           "parse_failures": c["parse_failures"],
           "judgments": c["judgments"], "candidate_len_tokens": manifest["mean_len"]["candidate_tokens"],
           **pair_quality(read_jsonl(it / "pairs.jsonl")),
           **pass_at_n(prompts, read_jsonl(it / "candidates.jsonl"))}
    if ranking:
        out.update(self_judge_vs_likelihood(lc, t))
    if (it / "meta_judgments.jsonl").exists():
        out.update(meta_agreement(prompts, read_jsonl(it / "candidates.jsonl"), read_jsonl(it / "judgments.jsonl"),
                                  read_jsonl(it / "meta_judgments.jsonl"), read_jsonl(it / "judge_pairs.jsonl")),
                   meta_judge_pairs=manifest.get("meta", {}).get("judge_pairs"),
                   **{k: manifest.get("meta", {}).get(k) for k in ("meta_ties", "meta_parse_failures", "meta_verdicts",
                                                                   "meta_position_bias", "meta_position_only")})
    return out


def meta_agreement(prompts: dict[str, str], candidates: list[dict], judgments: list[dict], metas: list[dict],
                   judge_pairs: list[dict]) -> dict:
    """The meta-judge against the checker, on an iteration's comparisons: where exactly one of the two judgments
    gives the right score (5 for a right text, 1 for a wrong one), how often the verdict names it
    (`meta_agree_score`, over `meta_score_cases`); where the reference meta-judgment (recipes/world/meta.py)
    names one, how often the verdict does (`meta_agree_step`, over `meta_step_cases`); and the judge pairs'
    quality: chosen with the right score and rejected with a wrong one (`judge_pair_ok`), the reverse
    (`judge_pair_bad`), chosen == the reference judgment (`judge_pair_ref`)."""
    from selfreward.recipes.world.judging import judgment
    from selfreward.recipes.world.meta import reference_verdict
    text = {(c["id"], c["sample"]): c["text"] for c in candidates}
    jd = {(j["id"], j["sample"], j["k"]): j for j in judgments}
    sc = st = sc_ok = st_ok = 0
    for m in metas:
        task, resp = parse_prompt(prompts[m["id"]]), text[(m["id"], m["sample"])]
        want = 5.0 if check(prompts[m["id"]], resp) == 1.0 else 1.0
        a, b = jd[(m["id"], m["sample"], m["a"])], jd[(m["id"], m["sample"], m["b"])]
        if (a["score"] == want) != (b["score"] == want):
            sc += 1
            sc_ok += m["verdict"] == ("A" if a["score"] == want else "B")
        ref = reference_verdict(task, resp, a["judgment"], b["judgment"])
        if ref is not None:
            st += 1
            st_ok += m["verdict"] == ref
    ok = bad = same = 0
    for p in judge_pairs:
        task, resp = parse_prompt(prompts[p["id"]]), text[(p["id"], p["sample"])]
        want = 5.0 if check(prompts[p["id"]], resp) == 1.0 else 1.0
        cs, rs = (jd[(p["id"], p["sample"], p[k])]["score"] for k in ("chosen_k", "rejected_k"))
        ok += cs == want and rs != want
        bad += rs == want and cs != want
        same += p["chosen"] == judgment(task, resp)
    n = max(1, len(judge_pairs))
    return {"meta_comparisons": len(metas), "meta_score_cases": sc, "meta_agree_score": sc_ok / sc if sc else None,
            "meta_step_cases": st, "meta_agree_step": st_ok / st if st else None,
            "judge_pair_ok": ok / n, "judge_pair_bad": bad / n, "judge_pair_ref": same / n}


def paired(results: dict[str, dict], a: str, b: str) -> dict | None:
    """Greedy accuracy of model a minus model b on the same held-out prompts, with the paired standard error
    (the standard deviation of the per-prompt differences over sqrt(n))."""
    if a not in results or b not in results:
        return None
    from selfreward.recipes.metrics import paired_diff
    x, y = results[a]["greedy_correct"], results[b]["greedy_correct"]
    m, se = paired_diff(x, y)
    return {"diff": m, "se": se, "n": len(x)}


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
