"""Instruction backtranslation on Open Assistant trees: the seed is the first-turn (prompt, rank-0 reply)
pairs of some trees; the unlabelled corpus is the first-turn assistant replies of the other trees, their
prompts hidden from the recipe (kept aside in RUN/data/hidden.jsonl for the report only).

    python -m selfreward.recipes.humpback_oasst --oasst-input oasst.jsonl --base-model BASE --run-dir runs/hb-oasst
        [--oasst-seed-frac 0.5] [any recipes.humpback flag: --curate-k 3, --sft-max-steps 100, ...]

Report (RUN/oasst_report.json, printed): ROUGE-L F1 of each backtranslated instruction x_hat against the
reply's real prompt (mean, and the share >= 0.5); per iteration, the curation scores against the human
ranks: the mean score of the rank-0 replies and of the others, and over every (rank 0, lower-ranked) pair of
replies to one prompt, the share where the rank-0 reply scored higher, lower, or the same.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from selfreward import cli
from selfreward.recipes.humpback import SET_HERE, HumpbackConfig, run_humpback, run_path
from selfreward.records import DataError, read_jsonl, write_json, write_jsonl


@dataclass
class OasstHumpbackConfig(HumpbackConfig):
    oasst_input: str = ""             # OASST export (trees or the flat message table, recipes/oasst.py)
    oasst_seed_frac: float = 0.5      # share of the trees (by a hash of the root id) whose pairs are the seed
    oasst_lang: str = "en"            # "" = any language


def _seed_tree(root_id: str, frac: float, seed: int) -> bool:
    return int(hashlib.sha1(f"{seed}:{root_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def write_data(cfg: OasstHumpbackConfig, out: Path) -> tuple[Path, Path, Path]:
    """-> (seed pairs, unlabelled replies {"text"}, hidden truth {"prompt", "group", "rank"} line by line)."""
    from selfreward.recipes.oasst import ift_pairs, load_messages
    roots = load_messages(cfg.oasst_input)
    lang = cfg.oasst_lang or None
    seed_roots = [r for r in roots if _seed_tree(r.id, cfg.oasst_seed_frac, cfg.seed)]
    rest = [r for r in roots if not _seed_tree(r.id, cfg.oasst_seed_frac, cfg.seed)]
    seed = ift_pairs(seed_roots, lang)
    replies = [(r, c) for r in rest if r.role == "prompter" and not r.deleted and (lang is None or r.lang == lang)
               for c in r.replies if c.role == "assistant" and not c.deleted and (lang is None or c.lang == lang)]
    if not seed or not replies:
        raise DataError(f"{cfg.oasst_input}: {len(seed)} seed pairs and {len(replies)} unlabelled replies "
                        f"(need both; try another --oasst-seed-frac)")
    return (write_jsonl(out / "seed.jsonl", seed),
            write_jsonl(out / "unlabelled.jsonl", [{"text": c.text} for _, c in replies]),
            write_jsonl(out / "hidden.jsonl", [{"prompt": r.text, "group": r.id, "rank": c.rank} for r, c in replies]))


def report(hc: HumpbackConfig, hidden: list[dict]) -> dict:
    from rouge_score import rouge_scorer
    from selfreward.recipes.curate import pair_scores
    cands = read_jsonl(run_path(hc, "candidates.jsonl"))
    truth = lambda c: hidden[int(c["source"].rsplit(":", 1)[1]) - 1]   # noqa: E731  (the reply's line)
    sc = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [sc.score(truth(c)["prompt"], c["instruction"])["rougeL"].fmeasure for c in cands]
    out = {"candidates": len(cands), "rouge_l_mean": mean(rouge) if rouge else None,
           "rouge_l_share_ge_0.5": sum(r >= 0.5 for r in rouge) / len(rouge) if rouge else None, "iterations": {}}
    for t in range(1, hc.iterations + 1):
        per = pair_scores(read_jsonl(run_path(hc, f"iter_{t}", "ratings.jsonl")), hc.curate.score_from)
        by_reply: dict[tuple, list[float]] = {}
        for c in cands:                                  # a reply cut into segments: the mean of their scores
            if per.get(c["id"]) is not None:
                h = truth(c)
                by_reply.setdefault((h["group"], h["rank"], c["source"]), []).append(per[c["id"]])
        score = {k: mean(v) for k, v in by_reply.items()}
        top = [v for (g, r, _), v in score.items() if r == 0]
        low = [v for (g, r, _), v in score.items() if r is not None and r > 0]
        hi = lo = tie = 0
        for (g, r, _), v in score.items():
            if r != 0:
                continue
            for (g2, r2, _), v2 in score.items():
                if g2 == g and r2 is not None and r2 > 0:
                    hi, lo, tie = hi + (v > v2), lo + (v < v2), tie + (v == v2)
        n = hi + lo + tie
        out["iterations"][t] = {"mean_score_rank0": mean(top) if top else None,
                                "mean_score_lower_ranked": mean(low) if low else None, "rank_pairs": n,
                                "rank0_higher": hi / n if n else None, "rank0_lower": lo / n if n else None,
                                "tied": tie / n if n else None}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(OasstHumpbackConfig, __doc__, skip=SET_HERE | {"": {"seed_data", "unlabelled"}})
    cfg = cli.build(OasstHumpbackConfig, p.parse_args(argv))
    if not cfg.oasst_input or not cfg.run_dir:
        raise cli.ConfigError("--oasst-input and --run-dir are required")
    seed, unl, hidden = write_data(cfg, Path(cfg.run_dir) / "data")
    plain = {k: v for k, v in cli.to_dict(cfg).items() if not k.startswith("oasst_")}
    hc = cli.from_dict(HumpbackConfig, {**plain, "seed_data": str(seed), "unlabelled": [str(unl)]})
    run_humpback(hc)
    rep = report(hc, read_jsonl(hidden))
    write_json(Path(cfg.run_dir) / "oasst_report.json", rep)
    print(f"[humpback-oasst] {rep['candidates']} candidates: ROUGE-L of x_hat vs the real prompt "
          f"{rep['rouge_l_mean']:.3f} (share >= 0.5: {rep['rouge_l_share_ge_0.5']:.3f})", flush=True)
    for t, r in rep["iterations"].items():
        print(f"[humpback-oasst] iteration {t}: mean score rank 0 {r['mean_score_rank0']}, lower-ranked "
              f"{r['mean_score_lower_ranked']}; of {r['rank_pairs']} (rank 0, lower) pairs rank 0 scored higher in "
              f"{r['rank0_higher']}, lower in {r['rank0_lower']}, tied in {r['tied']}", flush=True)
    return rep


if __name__ == "__main__":
    cli.run_main(main)
