"""The self-rewarding loop: M_t makes prompts, answers them N times, judges its answers K times, pairs the
best with the worst, and DPO on those pairs (reference M_t) gives M_{t+1}. Iterations t = 1..T from M1.

    python -m selfreward.recipes.self_reward --run-dir runs/demo --init M1 --seed-prompts seed/ift.jsonl --iterations 2
    python -m selfreward.recipes.self_reward --run-dir runs/demo --init M1 ... --stage judge --iter 1     # one stage
    torchrun --nproc_per_node 4 -m selfreward.recipes.self_reward --config runs/demo/config.json --stage candidates --iter 1

Layout: RUN/iter_t/{prompts,candidates,judgments,pairs}.jsonl, RUN/iter_t/model/ (= M_{t+1}),
RUN/iter_t/dpo/ (the trainer's run folder), RUN/iter_t/manifest.json; RUN/config.json holds the settings.
A stage whose file exists is skipped; a killed stage continues from its .partial file (selfreward.records).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from selfreward.recipes.instruct import InstructConfig, generate_prompts
from selfreward.records import DataError, PartialWriter, field as rfield, iter_jsonl, read_jsonl, write_json, \
    write_jsonl
from selfreward.recipes.judge import JudgeConfig, chat_prompt_ids, expected_scores, fit_prompt_ids, load_template, \
    prompt_budget
from selfreward.recipes.pairs import build_pairs, iteration_stats
from selfreward.records import dist_env, run_units

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prompts", "candidates", "judge", "pairs", "dpo")


@dataclass
class LoopConfig:
    run_dir: str = ""
    init_model: str = ""                 # M1: the checkpoint iteration 1 starts from
    iterations: int = 2                  # 2 = M1 -> M2 -> M3
    # prompts: "self-instruct" | a JSONL file of {"id"?, "prompt"} | fn(t, n, seed) -> [str | {"id", "prompt"}]
    prompt_source: str | Callable = "self-instruct"
    seed_prompts: str = ""               # self-instruct: JSONL with "prompt" (e.g. recipes.oasst's ift.jsonl)
    prompt_model: str = ""               # self-instruct generator; "" = M_t
    n_prompts: int = 1000
    prompt_temperature: float = 0.6
    prompt_top_p: float = 0.9
    prompt_max_tokens: int = 128
    prompt_min_words: int = 3
    prompt_max_words: int = 150
    rouge_threshold: float = 0.7
    n_candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    judge_k: int = 3
    judge_temperature: float = 0.7       # not stated in the paper; the candidates' settings
    judge_top_p: float = 0.9
    judge_max_tokens: int = 256
    judge_template: str = ""             # file, or a built-in name ("default", "short"); "" = default
    judge_expected: bool = False         # also the expected score from the digit distribution
    judge_distinct: bool = False         # judge each distinct candidate text of a prompt once (K times), and
                                         # skip prompts whose candidates are all one text (they cannot pair)
    score_from: str = "sampled"          # what pairs are built on: "sampled" (mean of K) | "expected"
    min_margin: float = 0.0              # keep a pair only if best - worst mean score >= this (0: any gap)
    chunk: int = 32                      # units per generate call (the grain of resume)
    dpo_args: list[str] = field(default_factory=list)   # passed verbatim to train/dpo.py
    nproc: int = 1                       # >1: sampling stages and DPO under torchrun
    eval_hook: Callable | None = None    # fn(t, model_dir) -> dict, on M_t for t = 1..T+1
    seed: int = 0

    def __post_init__(self):
        assert self.score_from in ("sampled", "expected"), f"score_from {self.score_from!r}"
        if self.score_from == "expected":
            self.judge_expected = True
        assert self.n_candidates >= 2 and self.judge_k >= 1 and self.iterations >= 1 and self.nproc >= 1

    def judge(self) -> JudgeConfig:
        return JudgeConfig(k=self.judge_k, temperature=self.judge_temperature, top_p=self.judge_top_p,
                           max_tokens=self.judge_max_tokens, template=load_template(self.judge_template or None),
                           expected=self.judge_expected, seed=self.seed)

    def settings(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("prompt_source", "eval_hook"):
            if callable(d[k]):
                d[k] = f"<callable {getattr(d[k], '__qualname__', repr(d[k]))}>"
        return d


def iter_dir(cfg: LoopConfig, t: int) -> Path:
    return Path(cfg.run_dir) / f"iter_{t}"


def model_at(cfg: LoopConfig, t: int) -> str:
    """M_t: the init model for t = 1, else what iteration t-1 trained."""
    return cfg.init_model if t == 1 else str(iter_dir(cfg, t - 1) / "model")


def _seed(cfg: LoopConfig, t: int, stage: int) -> int:
    return cfg.seed * 1_000_003 + t * 10_007 + stage * 100_000_007


class Models:
    """One loaded (engine, tokenizer) at a time, reused across the stages that need the same checkpoint."""

    def __init__(self):
        self.path, self.pair = None, None

    def get(self, path: str):
        if path != self.path:
            from selfreward.infer.engine import Engine
            from selfreward.model.tokenizer import Tokenizer
            self.pair = None
            self.pair = (Engine.from_pretrained(path), Tokenizer.load(path))
            self.path = path
        return self.pair

    def release(self) -> None:
        """Drop the loaded model (before DPO or torchrun workers need the memory)."""
        self.path, self.pair = None, None


def _prompt_record(i, r, source: str, where: str) -> dict:
    if isinstance(r, str):
        return {"id": f"p{i}", "prompt": r, "source": source, "verdict": "ok"}
    return {"id": str(r.get("id", f"p{i}")), "prompt": rfield(r, "prompt", where), "source": source,
            "verdict": "ok"}


def stage_prompts(cfg: LoopConfig, t: int, models: Models) -> None:
    out = iter_dir(cfg, t) / "prompts.jsonl"
    if out.exists():
        return
    n, src = cfg.n_prompts, cfg.prompt_source
    if callable(src):
        recs = [_prompt_record(i, r, "given", f"prompt_source({t})") for i, r in enumerate(src(t, n, _seed(cfg, t, 0)))]
    elif src != "self-instruct":   # a file: the t-th block of n records, wrapping around
        rows = list(iter_jsonl(src))
        if not rows:
            raise DataError(f"{src}: no prompts")
        pick = [rows[((t - 1) * n + j) % len(rows)] for j in range(min(n, len(rows)))] if n > 0 else rows
        recs = [_prompt_record(i, r, "given", f"{src}:{line}") for i, (line, r) in enumerate(pick)]
    else:
        if not cfg.seed_prompts:
            raise ValueError("prompt_source 'self-instruct' needs seed_prompts (a JSONL with 'prompt')")
        seeds = [rfield(r, "prompt", f"{cfg.seed_prompts}:{i}") for i, r in iter_jsonl(cfg.seed_prompts)]
        earlier = [r["prompt"] for s in range(1, t) for r in read_jsonl(iter_dir(cfg, s) / "prompts.jsonl")
                   if r["verdict"] == "ok" and r["source"] == "generated"]
        icfg = InstructConfig(temperature=cfg.prompt_temperature, top_p=cfg.prompt_top_p,
                              max_tokens=cfg.prompt_max_tokens, min_words=cfg.prompt_min_words,
                              max_words=cfg.prompt_max_words, rouge_threshold=cfg.rouge_threshold,
                              seed=_seed(cfg, t, 0), batch=min(cfg.chunk, max(n, 1)))
        engine, tok = models.get(cfg.prompt_model or model_at(cfg, t))
        def whole_rounds(recs: list[dict]) -> list[dict]:   # a round torn by a kill is redone
            n = Counter(r["round"] for r in recs)
            return [r for r in recs if n[r["round"]] == icfg.batch]
        with PartialWriter(out, keep=whole_rounds) as w:
            generate_prompts(engine, tok, seeds, n, icfg, w, earlier, progress=True)
            recs = w.records
    # a prompt that leaves no room to answer within the context is set aside (M_t may not exist yet when
    # prompts are made ahead: the tokenizer and context are the init model's, which DPO does not change)
    engine, tok = models.get(model_at(cfg, t) if Path(model_at(cfg, t)).exists() else cfg.init_model)
    limit = getattr(engine, "max_len", 1 << 30) - 16
    seen = set()
    for r in recs:
        if r["id"] in seen:
            raise DataError(f"prompts of iteration {t}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        if r["verdict"] == "ok" and len(chat_prompt_ids(tok, r["prompt"])) > limit:
            r["verdict"] = "too_long_for_context"
    write_jsonl(out, recs)
    Path(str(out) + ".partial").unlink(missing_ok=True)


def stage_candidates(cfg: LoopConfig, t: int, models: Models, rank: int = 0, world: int = 1) -> None:
    from selfreward.infer.sequence import SamplingParams
    it = iter_dir(cfg, t)
    out = it / "candidates.jsonl"
    if out.exists():
        return
    prompts = [r for r in read_jsonl(it / "prompts.jsonl") if r["verdict"] == "ok"]
    engine, tok = models.get(model_at(cfg, t))
    base, n = _seed(cfg, t, 1), cfg.n_candidates

    def work(batch, emit):
        ids = [chat_prompt_ids(tok, p["prompt"]) for _, p in batch]
        ps = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=base + i * n) for i, _ in batch]
        for (i, p), comps in zip(batch, engine.generate(ids, ps, n=n)):
            emit(i, [{"id": p["id"], "sample": s, "text": c.text, "n_tokens": len(c.token_ids),
                      "finish_reason": c.finish_reason} for s, c in enumerate(comps)])
    run_units(out, prompts, n, lambda r: r["id"], work, cfg.chunk, rank, world, progress=f"candidates {t}")


def distinct_candidates(cands: list[dict]) -> list[dict]:
    """The candidates worth judging when identical texts are pooled (recipes.pairs.build_pairs does): the
    first sample of each distinct text, on prompts with at least two distinct texts. A small model repeats
    itself often (in the world demo about 6% of N = 8 candidates are distinct texts of such prompts), and a
    prompt with a single text can make no pair whatever its scores."""
    by: dict[str, dict[str, dict]] = {}
    for c in sorted(cands, key=lambda c: c["sample"]):
        by.setdefault(c["id"], {}).setdefault(c["text"], c)
    return [c for texts in by.values() if len(texts) > 1 for c in texts.values()]


def stage_judge(cfg: LoopConfig, t: int, models: Models, rank: int = 0, world: int = 1) -> None:
    from selfreward.infer.sequence import SamplingParams
    from selfreward.recipes.judge import parse_score
    it = iter_dir(cfg, t)
    out = it / "judgments.jsonl"
    if out.exists():
        return
    text = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    cands = read_jsonl(it / "candidates.jsonl")
    if cfg.judge_distinct:
        cands = distinct_candidates(cands)
    engine, tok = models.get(model_at(cfg, t))
    jc = cfg.judge()
    base, budget = _seed(cfg, t, 2), prompt_budget(engine, jc.max_tokens)

    def work(batch, emit):
        fitted = [fit_prompt_ids(tok, jc.template, text[c["id"]], c["text"], budget) for _, c in batch]
        ids = [f[0] for f in fitted]
        ps = [SamplingParams(temperature=jc.temperature, top_p=jc.top_p, max_tokens=jc.max_tokens,
                             seed=base + i * jc.k) for i, _ in batch]
        exp = expected_scores(engine, tok, ids, jc.score_prefix) if jc.expected else None
        for j, ((i, c), comps) in enumerate(zip(batch, engine.generate(ids, ps, n=jc.k))):
            recs = [{"id": c["id"], "sample": c["sample"], "k": k, "judgment": x.text,
                     "score": parse_score(x.text), "prompt_cut": fitted[j][1]} for k, x in enumerate(comps)]
            if exp is not None:
                for r in recs:
                    r["expected"] = round(exp[j][0], 4)
            emit(i, recs)
    run_units(out, cands, jc.k, lambda r: (r["id"], r["sample"]), work, cfg.chunk, rank, world,
              progress=f"judge {t}")


def stage_pairs(cfg: LoopConfig, t: int) -> dict:
    it = iter_dir(cfg, t)
    prompts = [r for r in read_jsonl(it / "prompts.jsonl") if r["verdict"] == "ok"]
    pairs, counts = build_pairs(prompts, read_jsonl(it / "candidates.jsonl"), read_jsonl(it / "judgments.jsonl"),
                                _score_key(cfg), min_margin=cfg.min_margin)
    if not (it / "pairs.jsonl").exists():
        write_jsonl(it / "pairs.jsonl", pairs)
    return counts


def _score_key(cfg: LoopConfig) -> str:
    return "score" if cfg.score_from == "sampled" else "expected"


def stage_dpo(cfg: LoopConfig, t: int) -> None:
    it = iter_dir(cfg, t)
    if (it / "model" / "config.json").exists():
        return
    if not read_jsonl(it / "pairs.jsonl"):
        raise RuntimeError(f"{it / 'pairs.jsonl'}: no pairs (every prompt tied or went unscored); "
                           f"see {it / 'manifest.json'}")
    argv = ["--model", model_at(cfg, t), "--data", str(it / "pairs.jsonl"), "--output", str(it / "dpo"),
            "--export", str(it / "model"), "--resume", "--seed", str(cfg.seed + t)] + list(cfg.dpo_args)
    if cfg.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
               str(ROOT / "train" / "dpo.py")] + argv
        subprocess.run(cmd, check=True, cwd=ROOT)
    else:
        from selfreward.train.dpo import main as dpo_main
        dpo_main(argv)


def _torchrun_stage(cfg: LoopConfig, stage: str, t: int) -> None:
    """Run a sampling stage under torchrun with the settings saved in RUN/config.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
           "-m", "selfreward.recipes.self_reward", "--config", str(Path(cfg.run_dir) / "config.json"),
           "--stage", stage, "--iter", str(t)]
    subprocess.run(cmd, check=True, cwd=ROOT)


def write_manifest(cfg: LoopConfig, t: int, extra: dict) -> dict:
    it = iter_dir(cfg, t)
    mpath = it / "manifest.json"
    old = json.loads(mpath.read_text()) if mpath.exists() else {}
    prompts = read_jsonl(it / "prompts.jsonl") if (it / "prompts.jsonl").exists() else []
    cands = read_jsonl(it / "candidates.jsonl") if (it / "candidates.jsonl").exists() else []
    judg = read_jsonl(it / "judgments.jsonl") if (it / "judgments.jsonl").exists() else []
    pairs = read_jsonl(it / "pairs.jsonl") if (it / "pairs.jsonl").exists() else []
    _, pc = build_pairs([p for p in prompts if p.get("verdict") == "ok"], cands, judg, _score_key(cfg))
    m = {"iteration": t, "model_in": model_at(cfg, t), "model_out": str(it / "model"),
         **iteration_stats(prompts, cands, judg, pairs, pc)}
    m["counts"]["judge_prompts_cut"] = sum(bool(j.get("prompt_cut")) for j in judg if j["k"] == 0)
    if any("expected" in j for j in judg):
        m["expected_score_mean"] = round(sum(j["expected"] for j in judg if j["k"] == 0) /
                                         max(1, sum(j["k"] == 0 for j in judg)), 4)
    m["timings"] = {**old.get("timings", {}), **extra.get("timings", {})}
    m["eval"] = {**old.get("eval", {}), **extra.get("eval", {})}
    m["settings"] = cfg.settings()
    write_json(mpath, m)
    return m


def run_iteration(cfg: LoopConfig, t: int, models: Models | None = None, stages=STAGES) -> dict:
    """M_t -> M_{t+1}: each stage skipped when its output exists."""
    models = models or Models()
    timings, ev = {}, {}
    old = iter_dir(cfg, t) / "manifest.json"
    done_eval = json.loads(old.read_text()).get("eval", {}) if old.exists() else {}
    if cfg.eval_hook is not None and f"M{t}" not in done_eval:
        ev[f"M{t}"] = cfg.eval_hook(t, model_at(cfg, t))
    for st in stages:
        t0 = time.perf_counter()
        if st == "prompts":
            stage_prompts(cfg, t, models)
        elif st in ("candidates", "judge"):
            out = iter_dir(cfg, t) / ("candidates.jsonl" if st == "candidates" else "judgments.jsonl")
            if cfg.nproc > 1 and not out.exists():
                models.release()
                _torchrun_stage(cfg, st, t)
            elif st == "candidates":
                stage_candidates(cfg, t, models)
            else:
                stage_judge(cfg, t, models)
        elif st == "pairs":
            stage_pairs(cfg, t)
        elif st == "dpo":
            models.release()
            stage_dpo(cfg, t)
        timings[st] = round(time.perf_counter() - t0, 2)
        write_manifest(cfg, t, {"timings": timings})
    if cfg.eval_hook is not None and t == cfg.iterations and f"M{t + 1}" not in done_eval:
        ev[f"M{t + 1}"] = cfg.eval_hook(t + 1, str(iter_dir(cfg, t) / "model"))
    return write_manifest(cfg, t, {"timings": timings, "eval": ev})


def run_loop(cfg: LoopConfig) -> list[dict]:
    """M1 -> M_{T+1}. Rerunning the same command after a crash continues where it stopped."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    conf = Path(cfg.run_dir) / "config.json"
    if not conf.exists() or json.loads(conf.read_text()) != cfg.settings():
        write_json(conf, cfg.settings())
    models = Models()
    out = []
    for t in range(1, cfg.iterations + 1):
        m = run_iteration(cfg, t, models)
        c = m["counts"]
        print(f"[self-reward] iter {t}: {c['prompts']} prompts, {c['candidates']} candidates, "
              f"{c['parse_failures']}/{c['judgments']} unparsable, {c['ties']} ties, {c['pairs']} pairs", flush=True)
        out.append(m)
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a RUN/config.json to start from (flags given as well override it)")
    ap.add_argument("--stage", default="all", choices=("all",) + STAGES)
    ap.add_argument("--iter", type=int, default=1, help="with --stage: the iteration t (M_t -> M_{t+1})")
    for f in dataclasses.fields(LoopConfig):
        if f.name == "eval_hook":
            continue
        flag = "--" + {"init_model": "init", "prompt_source": "prompts", "n_candidates": "n",
                       "judge_k": "k"}.get(f.name, f.name).replace("_", "-")
        if f.name == "dpo_args":
            ap.add_argument(flag, dest=f.name, type=shlex.split, help="extra train/dpo.py flags, one string")
        elif f.type in ("bool", bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, dest=f.name, type=typ, default=None)
    return ap


def main(argv: list[str] | None = None):
    a = _parser().parse_args(argv)
    base = json.loads(Path(a.config).read_text()) if a.config else {}
    base = {k: v for k, v in base.items() if k != "eval_hook" and not str(v).startswith("<callable")}
    over = {f.name: getattr(a, f.name) for f in dataclasses.fields(LoopConfig)
            if f.name != "eval_hook" and getattr(a, f.name) is not None}
    cfg = LoopConfig(**{**base, **over})
    rank, world = dist_env()
    if a.stage == "all":
        if world > 1:
            raise SystemExit("run the driver as one process and pass --nproc P: it launches torchrun per stage")
        return run_loop(cfg)
    models = Models()
    if a.stage == "candidates":
        stage_candidates(cfg, a.iter, models, rank, world)
    elif a.stage == "judge":
        stage_judge(cfg, a.iter, models, rank, world)
    elif rank == 0:
        {"prompts": lambda: stage_prompts(cfg, a.iter, models), "pairs": lambda: stage_pairs(cfg, a.iter),
         "dpo": lambda: stage_dpo(cfg, a.iter)}[a.stage]()
    if rank == 0:
        return write_manifest(cfg, a.iter, {})


if __name__ == "__main__":
    main()
