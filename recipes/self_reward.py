"""The self-rewarding loop: M_t makes prompts, answers them N times, judges its answers K times, pairs the
best with the worst, and DPO on those pairs (reference M_t) gives M_{t+1}. Iterations t = 1..T from M1.

    python -m selfreward.recipes.self_reward --run-dir runs/demo --init-model M1 --seed-prompts seed/ift.jsonl
    python -m selfreward.recipes.self_reward --config runs/demo/config.json --stage judge --iter 1   # one stage
    torchrun --nproc_per_node 4 -m selfreward.recipes.self_reward --config RUN/config.json --stage candidates

Flags are the nested config's fields (--candidates-n 4, --judge-k 3, --dpo-beta 0.1, --engine-dtype bfloat16);
with --base-model M0 --sft-data FILES a first stage trains M1. The run folder's layout, resume and the stages:
recipes/README.md, "The loop".
"""

import dataclasses
from collections import Counter
from pathlib import Path

from selfreward import cli
from selfreward.recipes import pipeline
from selfreward.recipes.instruct import generate_prompts, given_prompts
from selfreward.recipes.dpo_data import write_judge_pairs, write_judge_self, write_sft_mix
from selfreward.recipes.judge import check_fits, judge_items
from selfreward.recipes.meta_judge import check_meta_fits, meta_judge_items, meta_units
from selfreward.recipes.loop_config import LOOP_SET, LoopConfig
from selfreward.recipes.pairs import build_pairs, distinct_candidates, iteration_stats
from selfreward.recipes.select import select_from_run
from selfreward.recipes.session import Session
from selfreward.records import DataError, PartialWriter, field as rfield, iter_jsonl, \
    nonempty, read_json, read_jsonl, write_json, write_jsonl
from selfreward.train import report as dashboards

def model_at(cfg: LoopConfig, t: int) -> str:
    """M_t: M1 (--init-model, or RUN/m1 trained from --base-model) for t = 1, else what iteration t-1 trained."""
    if t == 1:
        return str(Path(cfg.run_dir) / "m1") if cfg.sft.data else cfg.init_model
    return str(pipeline.folder(cfg, t - 1) / "model")


def stage_sft(cfg: LoopConfig) -> None:
    """M0 -> M1 (RUN/m1): train/sft.py of --base-model on --sft-data (the paper: IFT + EFT)."""
    from selfreward.train.sft import train
    run = Path(cfg.run_dir)
    if not cfg.sft.data or (run / "m1" / "config.json").exists():
        return
    scfg = dataclasses.replace(cfg.sft, model=cfg.base_model, output=str(run / "sft"), export=str(run / "m1"),
                               resume=True, seed=cfg.seed, **dashboards.for_stage(cfg.report_to, run, "sft"))
    cli.launch(train, scfg, "selfreward.train.sft", cfg.nproc, run / "sft_config.json")


def stage_prompts(cfg: LoopConfig, t: int, s: Session) -> None:
    out = pipeline.folder(cfg, t) / "prompts.jsonl"
    if out.exists():
        return
    n, src = cfg.n_prompts, cfg.prompt_source
    if src != "self-instruct":
        recs = given_prompts(src, t, n, pipeline.seed(cfg, t, 0))
    else:
        if not cfg.seed_prompts:
            raise cli.ConfigError("--prompt-source self-instruct needs --seed-prompts (a JSONL with 'prompt')")
        seeds = [rfield(r, "prompt", f"{cfg.seed_prompts}:{i}") for i, r in iter_jsonl(cfg.seed_prompts)]
        earlier = [r["prompt"] for k in range(1, t) for r in read_jsonl(pipeline.folder(cfg, k) / "prompts.jsonl")
                   if r["verdict"] == "ok" and r["source"] == "generated"]
        icfg = dataclasses.replace(cfg.instruct, seed=pipeline.seed(cfg, t, 0), batch=min(cfg.chunk, max(n, 1)))
        engine, tok = s.get(cfg.prompt_model or model_at(cfg, t))

        def whole_rounds(recs: list[dict]) -> list[dict]:   # a round torn by a kill is redone
            k = Counter(r["round"] for r in recs)
            return [r for r in recs if k[r["round"]] == icfg.batch]
        with PartialWriter(out, keep=whole_rounds) as w:
            generate_prompts(engine, tok, seeds, n, icfg, w, earlier, progress=True)
            recs = w.records
    # a prompt that leaves no room to answer within the context is set aside (M_t may not exist yet when
    # prompts are made ahead: the tokenizer and context are the init model's, which DPO does not change)
    engine, tok = s.get(model_at(cfg, t) if Path(model_at(cfg, t)).exists() else model_at(cfg, 1))
    dup = [k for k, n in Counter(r["id"] for r in recs).items() if n > 1]
    if dup:
        raise DataError(f"prompts of iteration {t}: duplicate id {dup[0]!r}")
    for r in recs:
        if r["verdict"] == "ok" and len(tok.user_ids(r["prompt"])) > engine.max_len - 16:
            r["verdict"] = "too_long_for_context"
    write_jsonl(out, recs)
    Path(str(out) + ".partial").unlink(missing_ok=True)


def stage_candidates(cfg: LoopConfig, t: int, s: Session, rank: int = 0, world: int = 1) -> None:
    from selfreward.infer.sequence import SamplingParams
    it = pipeline.folder(cfg, t)
    out = it / "candidates.jsonl"
    if out.exists():
        return
    prompts = [r for r in read_jsonl(it / "prompts.jsonl", made_by="the prompts stage") if r["verdict"] == "ok"]
    engine, tok = s.get(model_at(cfg, t))
    c, base = cfg.candidates, pipeline.seed(cfg, t, 1)

    def work(batch, emit):
        ids = [tok.user_ids(p["prompt"]) for _, p in batch]
        ps = [SamplingParams(temperature=c.temperature, top_p=c.top_p, min_p=c.min_p, max_tokens=c.max_tokens,
                             seed=base + i * c.n)
              for i, _ in batch]

        def done(j: int, comps) -> None:           # a prompt's N samples, as soon as they are all finished
            i, p = batch[j]
            emit(i, [{"id": p["id"], "sample": k, "text": x.text, "token_ids": engine.reply_ids(x),
                      "n_tokens": len(x.token_ids), "finish_reason": x.finish_reason} for k, x in enumerate(comps)],
                 sum(len(x.token_ids) for x in comps))
        engine.generate(ids, ps, n=c.n, on_request=done)
    pipeline.units(cfg, rank, world, out, prompts, c.n, lambda r: r["id"], work, f"candidates {t}", "prompts")


def stage_judge(cfg: LoopConfig, t: int, s: Session, rank: int = 0, world: int = 1) -> None:
    it = pipeline.folder(cfg, t)
    out = it / "judgments.jsonl"
    if out.exists():
        return
    text = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    cands = read_jsonl(it / "candidates.jsonl", made_by="the candidates stage")
    if cfg.judge.distinct:
        cands = distinct_candidates(cands)
    engine, tok = s.get(model_at(cfg, t))
    jc, base = cfg.judging(), pipeline.seed(cfg, t, 2)

    def work(batch, emit):
        res = judge_items(engine, tok, [(text[c["id"]], c["text"]) for _, c in batch], jc,
                          [base + i * jc.k for i, _ in batch])
        for (i, c), r in zip(batch, res):
            emit(i, pipeline.judged(r, {"id": c["id"], "sample": c["sample"]}))
    pipeline.units(cfg, rank, world, out, cands, jc.k, lambda r: (r["id"], r["sample"]), work, f"judge {t}", "candidates")


def stage_meta_judge(cfg: LoopConfig, t: int, s: Session, rank: int = 0, world: int = 1) -> None:
    """--meta-judge: M_t compares each pair of distinct judgments of a response, in both orders
    (recipes/meta_judge.py) -> meta_judgments.jsonl, one record per comparison with its verdict."""
    it = pipeline.folder(cfg, t)
    out = it / "meta_judgments.jsonl"
    if out.exists():
        return
    text = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    resp = {(c["id"], c["sample"]): c["text"] for c in read_jsonl(it / "candidates.jsonl")}
    judg = read_jsonl(it / "judgments.jsonl", made_by="the judge stage")
    jtext = {(j["id"], j["sample"], j["k"]): j["judgment"] for j in judg}
    engine, tok = s.get(model_at(cfg, t))
    base = pipeline.seed(cfg, t, 6)

    def work(batch, emit):
        items = [(text[u["id"]], resp[(u["id"], u["sample"])], jtext[(u["id"], u["sample"], u["a"])],
                  jtext[(u["id"], u["sample"], u["b"])]) for _, u in batch]
        for (i, u), (m, v, cut) in zip(batch, meta_judge_items(engine, tok, items, cfg.meta, [base + i for i, _ in batch])):
            emit(i, [{**u, "meta": m, "verdict": v, "prompt_cut": cut}])
    pipeline.units(cfg, rank, world, out, meta_units(judg), 1, lambda u: (u["id"], u["sample"], u["a"], u["b"]),
                   work, f"meta-judge {t}", "comparisons")


def stage_pairs(cfg: LoopConfig, t: int) -> dict:
    """pairs.jsonl (with the prompt's ids as the sampler was given them) -> the iteration's statistics."""
    from selfreward.model.tokenizer import Tokenizer
    it = pipeline.folder(cfg, t)
    prompts = read_jsonl(it / "prompts.jsonl")
    cands = read_jsonl(it / "candidates.jsonl", made_by="the candidates stage")
    judg = read_jsonl(it / "judgments.jsonl", made_by="the judge stage")
    pairs, counts = build_pairs([p for p in prompts if p["verdict"] == "ok"], cands, judg,
                                "score" if cfg.score_from == "sampled" else "expected", min_margin=cfg.min_margin,
                                pairing=cfg.pairing, length_control=cfg.length_control)
    if (it / "pairs.jsonl").exists():
        pairs = read_jsonl(it / "pairs.jsonl")
    else:
        tok = Tokenizer.load(model_at(cfg, t))
        for p in pairs:
            p["prompt_token_ids"] = tok.user_ids(p["prompt"])
        write_jsonl(it / "pairs.jsonl", pairs)
    stats = iteration_stats(prompts, cands, judg, pairs, counts)
    if cfg.meta_judge:
        stats["meta"] = write_judge_pairs(cfg, t)[1]
    return stats


def stage_dpo(cfg: LoopConfig, t: int) -> None:
    """train/dpo.py from M_t (also the reference) on pairs.jsonl -> M_{t+1} in iter_t/model."""
    from selfreward.train.dpo import train
    it = pipeline.folder(cfg, t)
    if (it / "model" / "config.json").exists():
        return
    if not read_jsonl(it / "pairs.jsonl", made_by="the pairs stage"):
        raise DataError(f"{it / 'pairs.jsonl'}: no pairs (every prompt tied or went unscored); "
                        f"see {it / 'manifest.json'}")
    sel = cfg.select_every > 0
    data = dpo_inputs(cfg, t)
    dcfg = dataclasses.replace(cfg.dpo, model=model_at(cfg, t), data=data, resume=True,
                               output=str(it / "dpo"), export=str(it / ("dpo/final" if sel else "model")),
                               seed=cfg.seed + t, export_every=cfg.select_every,
                               **dashboards.for_stage(cfg.report_to, cfg.run_dir, f"iter_{t}-dpo"))
    if not (it / "dpo" / "final" / "config.json").exists():
        cli.launch(train, dcfg, "selfreward.train.dpo", cfg.nproc, it / "dpo_config.json")
    if sel:
        select_from_run(it / "dpo", model_at(cfg, t), dataclasses.replace(cfg.select, engine=cfg.engine), it / "model",
                        it / "select.json")


def dpo_inputs(cfg: LoopConfig, t: int) -> list[str]:
    """The files iteration t's DPO reads: the pairs, then the SFT mix, judge self-training, judge pairs."""
    it = pipeline.folder(cfg, t)
    return [str(it / "pairs.jsonl")] + ([str(write_sft_mix(cfg, it))] if cfg.sft_mix else []) \
        + ([str(write_judge_self(cfg, t))] if cfg.judge_self_train else []) \
        + ([str(it / "judge_pairs.jsonl")] if cfg.meta_judge and write_judge_pairs(cfg, t)[1]["judge_pairs"] else [])


def write_manifest(cfg: LoopConfig, t: int, timings: dict, stats: dict | None = None) -> dict:
    """RUN/iter_t/manifest.json (t = 0: RUN/manifest.json, M0 -> M1): the stage timings, the pairs stage's
    statistics, evaluations, settings."""
    mpath = pipeline.folder(cfg, t) / "manifest.json"
    stats = dict(stats or {})
    ev, m = stats.pop("eval", {}), read_json(mpath)
    m.update(iteration=t, model_in=model_at(cfg, t) if t else cfg.base_model, model_out=model_at(cfg, t + 1), **stats)
    m["timings"] = {**m.get("timings", {}), **timings}
    m["eval"] = {**m.get("eval", {}), **ev}
    if (pipeline.folder(cfg, t) / "select.json").exists():
        m["selection"] = read_json(pipeline.folder(cfg, t) / "select.json")
    m["settings"] = cli.to_dict(cfg)
    write_json(mpath, m)
    return m


def stage_eval(cfg: LoopConfig, t: int, last: bool, s: Session) -> dict | None:
    """M_t at the start of iteration t (last: M_{T+1} at the end of iteration T), once: the judge's Table 4
    metrics on --eval-groups, and cfg.eval_hook(t, model) (Python)."""
    k = t + last
    if not (cfg.eval_hook or cfg.eval_groups) or (last and t != cfg.iterations) or \
            f"M{k}" in read_json(pipeline.folder(cfg, t) / "manifest.json").get("eval", {}):
        return None
    model, ev = model_at(cfg, k), {}
    if cfg.eval_groups:
        from selfreward.recipes.evaluate import load_groups, rm_eval
        jc = dataclasses.replace(cfg.judge, seed=cfg.seed)
        r = rm_eval(*s.get(model), load_groups(cfg.eval_groups)[:cfg.eval_limit], jc)
        ev = {f"judge_{k}": r["sampled"][m] for k, m in (("pairwise", "pairwise_accuracy"), ("five_best", "five_best"),
              ("exact_match", "exact_match"), ("spearman", "spearman"), ("kendall_tau", "kendall_tau"))}
        ev["judge_parse_failures"] = r["parse_failures"]
    return {"eval": {f"M{k}": ev | (cfg.eval_hook(k, model) if cfg.eval_hook else {})}}


def prepare(cfg: LoopConfig, s: Session) -> None:
    if not (cfg.init_model or cfg.sft.data):
        raise cli.ConfigError("--init-model (M1), or --base-model and --sft-data (M1 trained here), is required")
    if cfg.prompt_source == "self-instruct":
        if not cfg.seed_prompts:
            raise cli.ConfigError("--prompt-source self-instruct needs --seed-prompts (a JSONL with 'prompt')")
        nonempty(read_jsonl(cfg.seed_prompts), f"--seed-prompts {cfg.seed_prompts}", "seed prompts")
    check_fits(*s.get(cfg.init_model or cfg.base_model), cfg.judge)   # a rubric that cannot fit fails now
    if cfg.meta_judge:
        check_meta_fits(*s.get(cfg.init_model or cfg.base_model), cfg.meta)


def report(cfg: LoopConfig, t: int, m: dict) -> None:
    c, ev = m["counts"], m.get("eval", {}).get(f"M{t}", {})
    print(f"[self-reward] iter {t}: {c['prompts']} prompts, {c['candidates']} candidates, "
          f"{c['parse_failures']}/{c['judgments']} unparsable, {c['ties']} ties, {c['pairs']} pairs"
          + "".join(f"; M{t} {k} {v:.3f}" for k, v in ev.items() if k == "judge_pairwise" and v is not None),
          flush=True)


RECIPE = pipeline.Recipe(
    "selfreward.recipes.self_reward", LoopConfig, head=(
        pipeline.Stage("sft", lambda c, *_: stage_sft(c), trains=True),), body=(
        pipeline.Stage("eval_in", lambda c, t, s, *_: stage_eval(c, t, False, s), timed=False),
        pipeline.Stage("prompts", lambda c, t, s, *_: stage_prompts(c, t, s), "prompts.jsonl"),
        pipeline.Stage("candidates", stage_candidates, "candidates.jsonl", shards=True),
        pipeline.Stage("judge", stage_judge, "judgments.jsonl", shards=True),
        pipeline.Stage("meta_judge", stage_meta_judge, "meta_judgments.jsonl", shards=True, when=lambda c: c.meta_judge),
        pipeline.Stage("pairs", lambda c, t, *_: stage_pairs(c, t)),
        pipeline.Stage("dpo", lambda c, t, *_: stage_dpo(c, t), trains=True),
        pipeline.Stage("eval_out", lambda c, t, s, *_: stage_eval(c, t, True, s), timed=False)),
    manifest=write_manifest, layout=("iter_*", "m1", "sft", "sft_config.json", "manifest.json"), prepare=prepare,
    report=report)


def run_loop(cfg: LoopConfig, overwrite: bool = False) -> list[dict]:
    """(M0 ->) M1 -> M_{T+1}: pipeline.run of the stages above (rerun to continue; --overwrite starts over) ->
    the iterations' manifests."""
    return pipeline.run(RECIPE, cfg, overwrite=overwrite)[1:]


def main(argv: list[str] | None = None):
    return pipeline.main(RECIPE, argv, __doc__, LOOP_SET)


if __name__ == "__main__":
    cli.run_main(main)
