"""Instruction backtranslation on Open Assistant trees: the seed is the first-turn (prompt, rank-0 reply)
pairs of some trees; the unlabelled corpus is the first-turn assistant replies of the other trees, their
prompts hidden from the recipe (kept aside in RUN/data/hidden.jsonl for the report only).

    python -m selfreward.recipes.humpback_oasst --oasst-input oasst.jsonl --base-model BASE --run-dir runs/hb-oasst
        [--oasst-seed-frac 0.5] [any recipes.humpback flag: --curate-k 3, --sft-max-steps 100, ...]

Report (RUN/oasst_report.json, printed): ROUGE-L F1 of x_hat against the real prompt; per iteration, the
curation scores against the human ranks (recipes/README.md, "OASST mode").
"""

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from selfreward import cli, nodes
from selfreward.recipes.humpback import SET_HERE, HumpbackConfig, run_humpback, run_path
from selfreward.records import DataError, read_jsonl, write_json, write_jsonl


@dataclass
class OasstHumpbackConfig(HumpbackConfig):
    oasst_input: str = ""             # OASST export (trees or the flat message table, recipes/oasst.py)
    oasst_seed_frac: float = 0.5      # share of the trees (by a hash of the root id) whose pairs are the seed
    oasst_lang: str = "en"            # "" = any language


def write_data(cfg: OasstHumpbackConfig, out: Path) -> tuple[Path, Path, Path]:
    """-> (seed pairs, unlabelled replies {"text"}, hidden truth {"prompt", "group", "rank"} line by line)."""
    from selfreward.recipes.oasst import held_out, ift_pairs, kept, load_messages
    roots, lang = load_messages(cfg.oasst_input), cfg.oasst_lang or None
    seed = ift_pairs([r for r in roots if held_out(r.id, cfg.oasst_seed_frac, cfg.seed)], lang)
    replies = [(r, c) for r in roots if not held_out(r.id, cfg.oasst_seed_frac, cfg.seed) and r.role == "prompter"
               and kept(r, lang) for c in r.replies if c.role == "assistant" and kept(c, lang)]
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
        top = [v for (_, r, _), v in score.items() if r == 0]
        low = [v for (_, r, _), v in score.items() if (r or 0) > 0]
        pairs = [(v, w) for (g, r, _), v in score.items() if r == 0
                 for (g2, r2, _), w in score.items() if g2 == g and (r2 or 0) > 0]
        n = len(pairs)
        out["iterations"][t] = {"mean_score_rank0": mean(top) if top else None,
                                "mean_score_lower_ranked": mean(low) if low else None, "rank_pairs": n,
                                **{k: sum(map(f, pairs)) / n if n else None for k, f in (
                                    ("rank0_higher", lambda p: p[0] > p[1]), ("rank0_lower", lambda p: p[0] < p[1]),
                                    ("tied", lambda p: p[0] == p[1]))}}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(OasstHumpbackConfig, __doc__, skip=SET_HERE | {"": {"seed_data", "unlabelled"}})
    cfg = cli.build(OasstHumpbackConfig, p.parse_args(argv))
    if not cfg.oasst_input or not cfg.run_dir:
        raise cli.ConfigError("--oasst-input and --run-dir are required")
    if cfg.node_rank > 0:                 # node 0 writes the data and the report (nodes.py)
        return nodes.follow(cfg) or {}
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
