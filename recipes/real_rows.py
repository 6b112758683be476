"""The real demo's rows (recipes/real_demo.py): the verifiable sets, the measure, and each method from M0, every
one judged by if-verifiable's checkers (recipes.verifiable). `cfg` is the demo's RealConfig, `run` its folder.
"""

import shutil
from pathlib import Path

from selfreward.recipes import verifiable
from selfreward.recipes.judge import JudgeConfig
from selfreward.recipes.loop_config import CandidatesConfig, LoopConfig
from selfreward.recipes.pairs import distinct_candidates
from selfreward.recipes.pipeline import folder, run_stage
from selfreward.recipes.self_reward import RECIPE, write_manifest
from selfreward.records import read_jsonl, write_jsonl


def make_sets(cfg, run: Path, s) -> dict:
    """recipes.verifiable's train / held-out records (RUN/sets/drawn), the training items M0 wrote by the loop's
    self-instruct step (--self-instruct), less the items whose chat prompt leaves no room for --max-tokens within
    the context (--max-length, at most M0's): the first --n-prompts OASST items and every self-instruct one
    -> RUN/sets/train.jsonl, the first --n-eval -> heldout.jsonl."""
    drawn = run / "sets" / "drawn"
    verifiable.main(["--oasst", cfg.oasst, "--out", str(drawn), "--held-out", str(cfg.n_eval),
                     "--eval-frac", str(cfg.eval_frac), "--seed", str(cfg.seed), "--train-draws", str(cfg.train_draws)])
    engine, tok = s.get(cfg.model)
    room = min(cfg.max_length, engine.max_len) - cfg.max_tokens - 1
    made = self_instruct(cfg, run, s) if cfg.self_instruct else []
    counts = {}
    for name, n, extra in (("train", cfg.n_prompts, made), ("heldout", cfg.n_eval, [])):
        recs = read_jsonl(drawn / f"{name}.jsonl")
        fits, more = ([r for r in rs if len(tok.user_ids(r["prompt"])) <= room] for rs in (recs, extra))
        write_jsonl(run / "sets" / f"{name}.jsonl", fits[:n or None] + more)
        counts |= {name: len(fits[:n or None] + more), f"{name}_too_long": len(recs + extra) - len(fits + more)}
        counts.setdefault("self_instruct", len(more))
    return counts


def self_instruct(cfg, run: Path, s) -> list[dict]:
    """--self-instruct N: the loop's prompts stage (recipes.instruct: few-shot from the training trees' OASST
    first turns, ROUGE-L filtered) with M0 writing up to N new requests in RUN/instruct/, each given one or two
    verifiable instructions as the OASST ones are -> training items (ids si-ID; never held out)."""
    import random
    from selfreward.recipes.oasst import load_messages, split_groups
    seeds = run / "sets" / "seed_prompts.jsonl"
    train_roots = split_groups(load_messages(cfg.oasst), cfg.eval_frac, cfg.seed, lambda r: r.id)[0]
    write_jsonl(seeds, [{"prompt": p["prompt"]} for p in verifiable.first_turns(train_roots)])
    lc = LoopConfig(run_dir=str(run / "instruct"), init_model=cfg.model, iterations=1, seed=cfg.seed,
                    n_prompts=cfg.self_instruct, prompt_source="self-instruct", seed_prompts=str(seeds),
                    engine=cfg.engine)
    run_stage(RECIPE, lc, "prompts", 1, s)
    made = [{"id": f"si-{r['id']}", "prompt": r["prompt"]} for r in read_jsonl(folder(lc, 1) / "prompts.jsonl")
            if r["verdict"] == "ok" and r["source"] == "generated"]
    return verifiable.attach(made, random.Random(f"{cfg.seed}:self-instruct"))


def measure(s, model: str, records: list[dict], max_tokens: int, out: Path) -> dict:
    """Greedy replies of `model` to `records` (its chat template) -> RUN/replies/NAME.jsonl and the row: strict
    prompt-level accuracy (the library's), its SE, n."""
    from selfreward.infer.sequence import SamplingParams
    engine, tok = s.get(model)
    outs = engine.generate([tok.user_ids(r["prompt"]) for r in records],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens), progress=True)
    texts = [o[0].text for o in outs]
    acc, se, sc = verifiable.accuracy(records, texts)
    write_jsonl(out, [{"id": r["id"], "response": x, "strict_ok": v.binary_strict == 1.0}
                      for r, x, v in zip(records, texts, sc)])
    k = [len(r["instruction_id_list"]) for r in records]       # IFEval's instruction-level strict accuracy too
    followed = sum(v.partial_strict * n for v, n in zip(sc, k))
    return {"accuracy": acc, "se": se, "n": len(records), "instruction_accuracy": followed / sum(k),
            "model_dir": model, "replies": str(out), "mean_reply_chars": round(sum(map(len, texts)) / len(texts), 1)}


def paired(base: str, other: str) -> dict:
    """Two models' replies to the same items (RUN/replies/*.jsonl): the other's strict accuracy minus the base's
    and the paired SE of that difference, sd(d_i) / sqrt(n) over the items' d_i in {-1, 0, 1}."""
    from selfreward.recipes.metrics import paired_diff
    a, b = ({r["id"]: float(r["strict_ok"]) for r in read_jsonl(p)} for p in (base, other))
    mu, se = paired_diff([b[k] for k in a], [a[k] for k in a])
    return {"vs_M0": mu, "paired_se": se}


def rl_row(cfg, run: Path, s, heldout: list[dict]) -> dict:
    """train/rl.py from M0 (also the KL reference) on the training prompts, the checker as the reward (--rl-reward
    ifeval: 1 when every instruction is followed; ifeval-partial: the share followed); RLOO over --rl-num-samples
    (REINFORCE with a value baseline for 1)."""
    from selfreward.train.rl import RLConfig, train
    train_set, out = str(run / "sets" / "train.jsonl"), run / "rl"
    last = {}
    if not (out / "model" / "config.json").exists():
        s.release()
        last = train(RLConfig(
            model=cfg.model, data=[train_set], output=str(out), reward=cfg.rl_reward, reward_template=train_set,
            max_steps=cfg.rl_steps, batch_size=cfg.rl_batch, micro_batch_size=cfg.rl_micro_batch, num_samples=cfg.rl_num_samples,
            estimator="rloo" if cfg.rl_num_samples > 1 else "reinforce", lr=cfg.rl_lr, final_lr=cfg.rl_lr / 10,
            beta=cfg.rl_beta, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_tokens,
            max_length=cfg.max_length, dropout=0.0, resume=True, seed=cfg.seed, threads=cfg.threads, cpu_bf16=cfg.cpu_bf16,
            engine=cfg.engine))
    return measure(s, str(out / "model"), heldout, cfg.max_tokens, run / "replies" / "rl.jsonl") | \
        {"train_reward_last": last.get("reward_mean")}


def loop_config(cfg, run_dir: Path, score_from: str | None = None) -> LoopConfig:
    """One iteration of recipes.self_reward from M0 (no SFT) on the training prompts: N candidates each, M0 judges
    K times under the paper's rubric (--judge-template), best-worst pairs, --dpo-steps of train/dpo.py.
    `score_from`: what pairs rank by (default --score-from; the checker's judgments are "sampled" scores)."""
    from selfreward.train.dpo import DPOConfig
    return LoopConfig(
        run_dir=str(run_dir), init_model=cfg.model, iterations=1, n_prompts=0, seed=cfg.seed, engine=cfg.engine,
        prompt_source=str(Path(cfg.run_dir) / "sets" / "train.jsonl"), score_from=score_from or cfg.score_from,
        meta_judge=cfg.meta_judge and score_from is None, length_control=cfg.length_control,
        candidates=CandidatesConfig(n=cfg.n_candidates, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=cfg.max_tokens),
        judge=JudgeConfig(k=cfg.judge_k, max_tokens=cfg.judge_max_tokens, template=cfg.judge_template,
                          expected=cfg.score_from == "expected", distinct=True),
        dpo=DPOConfig(lr=cfg.dpo_lr, final_lr=cfg.dpo_lr / 10, beta=cfg.dpo_beta, max_steps=cfg.dpo_steps,
                      batch_size=cfg.dpo_batch, max_length=cfg.max_length, dropout=0.0, threads=cfg.threads,
                      cpu_bf16=cfg.cpu_bf16))


def checker_judgments(by_id: dict[str, dict], cands: list[dict]) -> list[dict]:
    """One judgment per distinct candidate text (of prompts with two or more): score 5 x the share of its
    instructions followed (if-verifiable's partial_strict). The ranking is (strict_ok, instructions followed):
    5 is strict_ok, and a count followed breaks ties among the failures; equal shares tie (no pair)."""
    out = []
    for c in distinct_candidates(cands):
        share = verifiable.scores(by_id[c["id"]], c["text"]).partial_strict
        out.append({"id": c["id"], "sample": c["sample"], "k": 0, "score": 5.0 * share, "prompt_cut": False,
                    "judgment": f"checker: {share:.3f} of the instructions followed"})
    return out


def iteration(lc: LoopConfig, s, judgments=None, copy_from: Path | None = None) -> dict:
    """The loop's stages for iteration 1: prompts, candidates (copied from `copy_from`'s iteration 1 when it has
    them: the same M0, settings and seeds sample the same texts), judgments (`judgments(prompts by id,
    candidates)`, else the loop's judge stage: M0 judging), pairs, and DPO when there are pairs and --dpo-steps
    -> the pairs stage's statistics (also in iter_1/manifest.json)."""
    it = folder(lc, 1)
    it.mkdir(parents=True, exist_ok=True)
    for name in ("prompts.jsonl", "candidates.jsonl"):
        if copy_from and (copy_from / "iter_1" / name).exists() and not (it / name).exists():
            shutil.copy2(copy_from / "iter_1" / name, it / name)
    run_stage(RECIPE, lc, "prompts", 1, s)
    run_stage(RECIPE, lc, "candidates", 1, s)
    if judgments is None:
        run_stage(RECIPE, lc, "judge", 1, s)
        if lc.meta_judge:
            run_stage(RECIPE, lc, "meta_judge", 1, s)
    elif not (it / "judgments.jsonl").exists():
        write_jsonl(it / "judgments.jsonl", judgments(read_jsonl(it / "candidates.jsonl")))
    stats = run_stage(RECIPE, lc, "pairs", 1, s)
    if stats["counts"]["pairs"] and lc.dpo.max_steps:
        run_stage(RECIPE, lc, "dpo", 1, s)
    write_manifest(lc, 1, {}, stats)
    return stats


def trained_row(lc: LoopConfig, s, stats: dict, heldout: list[dict], max_tokens: int, out: Path) -> dict:
    """The measure of iter_1/model, with the iteration's counts; no pairs (or no DPO steps): no model, no row."""
    c = stats["counts"]
    row = {k: c[k] for k in ("prompts", "candidates", "ties", "pairs")}
    model = folder(lc, 1) / "model"
    return row | (measure(s, str(model), heldout, max_tokens, out) if (model / "config.json").exists()
                  else {"accuracy": None, "se": None, "n": None, "note": "no model: no pairs or --dpo-steps 0"})


def judge_agreement(by_id: dict[str, dict], pairs: list[dict]) -> dict:
    """The self-judge's pairs against the checker (if-verifiable's share of instructions followed): the share
    whose chosen reply follows more of them (agree), fewer (disagree), as many (tie)."""
    d = [verifiable.scores(by_id[p["id"]], p["chosen"]).partial_strict
         - verifiable.scores(by_id[p["id"]], p["rejected"]).partial_strict for p in pairs]
    n = len(d) or None
    return {"judge_pairs": len(d), "judge_agree": n and sum(x > 0 for x in d) / n,
            "judge_disagree": n and sum(x < 0 for x in d) / n, "judge_tie": n and sum(x == 0 for x in d) / n}


def label_row(cfg, s, pairs: list[dict], out: Path) -> dict:
    """RLAIF part 1: M0's soft labels (recipes.rlaif.soft_labels, both orders) on checker-known pairs (the
    oracle's: its chosen follows more instructions), the better reply shown first in every other pair ->
    agreement with the checker (ties count half) and position bias."""
    from selfreward.recipes.rlaif import LabelConfig, position_bias, soft_labels
    pairs = pairs[:cfg.label_limit or None]
    if not pairs:
        return {"pairs": 0}
    items = [(p["prompt"], p["chosen"], p["rejected"]) if i % 2 == 0 else (p["prompt"], p["rejected"], p["chosen"])
             for i, p in enumerate(pairs)]
    recs = soft_labels(*s.get(cfg.model), items, LabelConfig(seed=cfg.seed))["records"]
    write_jsonl(out, [{"id": p["id"], "better_first": i % 2 == 0, **r} for i, (p, r) in enumerate(zip(pairs, recs))])

    def agree(probs: list[float]) -> float:
        hits = [0.5 if abs(q - 0.5) < 1e-9 else float((q > 0.5) == (i % 2 == 0)) for i, q in enumerate(probs)]
        return sum(hits) / len(hits)
    return {"pairs": len(recs), "agreement_one_order": agree([r["p_first"] for r in recs]),
            "agreement_both_orders": agree([r["label"][0] for r in recs]), "position_bias": position_bias(recs)}


def table4(cfg, s, run: Path, models: dict[str, str]) -> dict:
    """The paper's Table 4 (the judge against OASST's human ranks) on the held-out trees' ranked reply groups
    (recipes.oasst with the sets' --eval-frac and --seed: the trees the verifiable held-out items come from),
    each model judging every reply --judge-k times under the paper's rubric, with the expected score ->
    {model: {sampled, expected: the metrics; groups, replies, parse_failures}}."""
    from selfreward.recipes import oasst
    from selfreward.recipes.evaluate import load_groups, rm_eval
    out = run / "sets" / "oasst"
    oasst.main(["--input", cfg.oasst, "--out", str(out), "--eval-frac", str(cfg.eval_frac), "--seed", str(cfg.seed)])
    groups = load_groups(out / "groups_eval.jsonl")[:cfg.table4_limit or None]
    jc = JudgeConfig(k=cfg.judge_k, max_tokens=cfg.judge_max_tokens, template="default", expected=True,
                     seed=cfg.seed)
    keys = ("pairwise_accuracy", "five_best", "exact_match", "spearman", "kendall_tau")
    res = {}
    for name, model in models.items():
        if (Path(model) / "config.json").exists():
            r = rm_eval(*s.get(model), groups, jc, progress=True)
            res[name] = {"groups": len(groups), "replies": len(r["records"]), "parse_failures": r["parse_failures"],
                         **{m: {k: r[m][k] for k in keys} for m in ("sampled", "expected")}}
    return res
