"""The demo's report: a terminal table, RUN/summary.json and RUN/curves.png (when matplotlib is installed)."""
from __future__ import annotations

from pathlib import Path

from selfreward import progress
from selfreward.recipes.world.checker import check

COLUMNS = [("model", "model", "{}"), ("greedy_acc", "acc greedy", "{:.3f}"), ("greedy_acc_se", "SE", "{:.3f}"),
           ("pass_at_n", "pass@N", "{:.3f}"), ("sampled_acc", "acc T", "{:.3f}"),
           ("judge_pairwise", "judge pw", "{:.3f}"), ("judge_pairwise_se", "SE", "{:.3f}"),
           ("judge_spearman", "spearman", "{:.3f}"),
           ("judge_parse_failures", "j.unparsed", "{}"), ("mean_len_tokens", "len tok", "{:.1f}"),
           ("loop_pass_at_n", "loop pass@N", "{:.3f}"), ("pairs", "pairs", "{}"), ("ties", "ties", "{}"),
           ("parse_failures", "unparsed", "{}"), ("pair_quality", "pair ok", "{:.2f}"),
           ("pair_backwards", "pair bad", "{:.2f}"), ("judge_rw", "judge r>w", "{:.2f}"),
           ("judge_wr", "judge w>r", "{:.2f}"), ("likelihood_rw", "lik r>w", "{:.2f}"),
           ("meta_judge_pairs", "j.pairs", "{}"), ("meta_agree_score", "meta ok", "{:.2f}")]


def pair_quality(pairs: list[dict]) -> dict:
    """By the checker: the share of pairs whose chosen reply is right and rejected wrong, the share the judge
    got backwards (chosen wrong, rejected right), and the share whose two texts are the same."""
    good = bad = same = 0
    for p in pairs:
        c, r = check(p["prompt"], p["chosen"]), check(p["prompt"], p["rejected"])
        good += c == 1.0 and r == 0.0
        bad += c == 0.0 and r == 1.0
        same += p["chosen"] == p["rejected"]   # one text sampled twice, judged differently: no signal
    n = max(1, len(pairs))
    return {"pair_quality": good / n if pairs else None, "pair_backwards": bad / n if pairs else None,
            "pair_identical": same / n if pairs else None}


def table(rows: list[dict]) -> str:
    return progress.table(rows, COLUMNS)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[world] matplotlib is not installed (pip install -e '.[plot]'): no plot, the table and "
              "summary.json hold the same figures", flush=True)
        return None
    by = {r["model"]: r for r in rows}
    names = [r["model"] for r in rows if "-" not in r["model"]]      # M0 .. M3 on the x axis
    x = {n: i for i, n in enumerate(names)}
    lines = [("self-judged (M_t)", names, "-", "o")]
    for c, label, base, style in (("oracle", "oracle: the checker's pairs", "M1", ("--", "*")),
                                  ("fixed", "fixed judge: M1 judges", "M2", (":", "s")),
                                  ("meta-oracle", "judge pairs by the reference meta-judge", "M1", ("-.", "D"))):
        ctl = [n for n in by if n.partition("-")[2] == c]
        if ctl:
            lines.append((label, [base] + ctl, *style))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "greedy_acc", "held-out greedy accuracy (checker), +- 1 SE"),
                           (axes[1], "judge_pairwise", "judge pairwise accuracy (held-out groups), +- 1 SE")):
        for label, ns, ls, mk in lines:
            xs = [x.get(n, x.get(n.split("-")[0], 0)) for n in ns]
            ys = [by[n].get(key) for n in ns]
            err = [by[n].get(key + "_se") or 0 for n in ns]
            ax.errorbar(xs, ys, yerr=err, marker=mk, linestyle=ls, capsize=3, label=label)
        if key == "greedy_acc":
            ax.plot([x[n] for n in names if "pass_at_n" in by[n]], [by[n]["pass_at_n"] for n in names
                                                                   if "pass_at_n" in by[n]],
                    marker="^", linestyle="-", alpha=0.5, label="pass@N (self-judged)")
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def ranking_on_mixed(prompts: dict[str, str], candidates: list[dict], judgments: list[dict],
                     likelihood=None) -> dict:
    """The necessary condition for self-rewarding, measured on one iteration's files: on the prompts whose
    distinct candidate texts are partly right and partly wrong (by the checker), how often does the
    self-judge's mean score rank a right text above a wrong one ("judge_rw"), below it ("judge_wr"), or tie?
    And, as the baseline the judge must beat, the same for the model's own log-likelihood of the texts
    (`likelihood(list of (prompt, text)) -> list of float`, e.g. summed log-probs under M_t): DPO on the
    judge's pairs can only teach the generator something when the judge ranks its samples better than the
    generator already does. Identical texts pool their judgments, as recipes.pairs does."""
    from collections import defaultdict
    from itertools import product

    from selfreward.recipes.judge import mean_score

    scores = defaultdict(list)
    for j in judgments:
        scores[(j["id"], j["sample"])].append(j["score"])
    texts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for c in candidates:
        texts[c["id"]][c["text"]] += scores[(c["id"], c["sample"])]
    items = []                                     # (pid, text, right, judge mean score)
    for pid, by_text in texts.items():
        oks = {t: check(prompts[pid], t) == 1.0 for t in by_text}
        if len(set(oks.values())) == 2:
            items += [(pid, t, oks[t], mean_score(by_text[t])) for t in sorted(by_text)]
    out = {"mixed_prompts": len({i[0] for i in items}), "right_wrong_pairs": 0}
    lik = likelihood([(prompts[i[0]], i[1]) for i in items]) if likelihood and items else None
    for name, vals in (("judge", [i[3] for i in items]), ("likelihood", lik)):
        if vals is None:
            continue
        by = defaultdict(list)
        for it, v in zip(items, vals):
            by[it[0]].append((it[2], v))
        n = rw = wr = 0
        for v in by.values():
            for a, b in product(v, v):
                if a[0] and not b[0]:
                    n += 1
                    if a[1] is not None and b[1] is not None:
                        rw += a[1] > b[1]
                        wr += a[1] < b[1]
        out["right_wrong_pairs"] = n
        out[f"{name}_rw"] = rw / n if n else None
        out[f"{name}_wr"] = wr / n if n else None
    return out


def plot_humpback(rows: list[dict], prec: dict, path: Path) -> Path | None:
    """The Humpback mode's figure: held-out greedy accuracy per model (left), the checker's precision of all
    candidate pairs and of A4 / A5 per iteration (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[world] matplotlib is not installed: no plot (summary.json holds the figures)", flush=True)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] + (f"\niter {r['iteration']}" if r["iteration"] else "") for r in rows]
    axes[0].bar(range(len(rows)), [r["greedy_acc"] for r in rows], color="tab:blue")
    axes[0].set_xticks(range(len(rows)), names, fontsize=8)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out greedy accuracy (checker)")
    its = range(1, len(prec["precision_a4"]) + 1)
    axes[1].axhline(prec["precision_all"], color="gray", linestyle="--", label="all candidate pairs")
    for k in (4, 5):
        axes[1].plot(list(its), prec[f"precision_a{k}"], marker="o", label=f"A{k}")
    axes[1].set_xticks(list(its), [f"iteration {i}" for i in its])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("precision of the pairs (checker)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
