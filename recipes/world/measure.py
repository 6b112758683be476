"""What the demo reports for each model, all judged by the world's checker.

- held-out accuracy: greedy (with its standard error and the per-prompt results, for paired differences),
  and sampled at the candidates' temperature, N samples on the first `n_pass` prompts (the responses the
  loop pairs): the mean accuracy of the samples and pass@N, the share of prompts with a right one;
- mean response length (tokens and characters) of the greedy responses;
- the model as judge: fixed held-out groups of three replies (the right answer, rank 0, and two one-edit wrong
  answers, rank 1), judged K times with the world's template through recipes.evaluate.rm_eval, giving the
  reward-model metrics (pairwise accuracy with a binomial standard error over its pairs, 5-best, exact match,
  Spearman, Kendall tau) and parse failures.
The groups and prompts are the same for every model, so the rows of the table compare like with like.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from selfreward.recipes.world.checker import is_correct
from selfreward.recipes.world.judging import JUDGE_TEMPLATE
from selfreward.recipes.world.tasks import DEFAULT_KINDS, corrupt, heldout_eval_set


@dataclass
class MeasureConfig:
    n_eval: int = 1000                # held-out prompts for greedy accuracy
    n_judge: int = 100                # held-out groups (3 replies each) for the judge metrics
    temperature: float = 0.7          # the candidates' sampling settings
    top_p: float = 0.9
    samples: int = 8                  # sampled responses per prompt (pass@samples), on the first n_pass prompts
    n_pass: int = 200
    max_tokens: int = 24
    judge_k: int = 3
    judge_temperature: float = 0.7
    judge_top_p: float = 0.9
    judge_max_tokens: int = 64
    template: str = JUDGE_TEMPLATE
    kinds: tuple[str, ...] = DEFAULT_KINDS   # the world's task kinds (the demo's --m0-kinds)
    seed: int = 0


def judge_groups(n: int, seed: int = 0, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[dict]:
    rng = random.Random(f"judge-groups:{seed}")
    groups = []
    for i, t in enumerate(heldout_eval_set(n, seed=4321 + seed, kinds=kinds)):
        wrong = []
        while len(wrong) < 2:
            w = corrupt(t.answer, rng)
            if w not in wrong:
                wrong.append(w)
        groups.append({"id": f"g{i}", "prompt": t.prompt, "kind": t.kind,
                       "replies": [{"text": t.answer, "rank": 0}] + [{"text": w, "rank": 1} for w in wrong]})
    return groups


def _binomial_se(p: float | None, n: int) -> float | None:
    """sqrt(p (1 - p) / n): the standard error of a share p of n trials. For the judge's pairwise accuracy n is
    its pairs, two per group and not independent (one judgment of the right reply enters both), so the true
    error is larger than this."""
    return None if p is None or not n else (p * (1 - p) / n) ** 0.5


def measure(model_dir: str, cfg: MeasureConfig, engine_cfg=None) -> dict:
    from selfreward.infer.sequence import SamplingParams
    from selfreward.recipes.evaluate import rm_eval
    from selfreward.recipes.judge import JudgeConfig
    from selfreward.recipes.session import Session

    engine, tok = Session(engine_cfg).get(model_dir)
    tasks = heldout_eval_set(cfg.n_eval, seed=1234 + cfg.seed, kinds=cfg.kinds)
    ids = [tok.user_ids(t.prompt) for t in tasks]
    greedy = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens))
    n_pass = min(cfg.n_pass, len(ids))
    ps = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                         seed=cfg.seed * 7919 + i * cfg.samples) for i in range(n_pass)]
    sampled = engine.generate(ids[:n_pass], ps, n=cfg.samples)
    by_kind = defaultdict(list)
    g_ok = []
    for t, comps in zip(tasks, greedy):
        ok = is_correct(t, comps[0].text)
        g_ok.append(ok)
        by_kind[t.kind].append(ok)
    s_ok = [[is_correct(t, c.text) for c in comps] for t, comps in zip(tasks, sampled)]
    pass_kind = defaultdict(list)
    for t, oks in zip(tasks, s_ok):
        pass_kind[t.kind].append(any(oks))
    acc = sum(g_ok) / len(g_ok)
    texts = [c[0].text for c in greedy]
    jc = JudgeConfig(k=cfg.judge_k, temperature=cfg.judge_temperature, top_p=cfg.judge_top_p,
                     max_tokens=cfg.judge_max_tokens, seed=cfg.seed)
    jc.text = cfg.template            # the world's rubric itself
    rm = rm_eval(engine, tok, judge_groups(cfg.n_judge, cfg.seed, cfg.kinds), jc)
    s = rm["sampled"]
    return {
        "greedy_acc": acc, "greedy_acc_se": _binomial_se(acc, len(g_ok)), "n_eval": len(g_ok),
        "greedy_correct": "".join("1" if x else "0" for x in g_ok),
        "sampled_acc": sum(map(sum, s_ok)) / max(1, sum(map(len, s_ok))),
        "pass_at_n": sum(map(any, s_ok)) / max(1, len(s_ok)), "pass_n": cfg.samples, "n_pass": len(s_ok),
        "acc_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
        "pass_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(pass_kind.items())},
        "mean_len_tokens": sum(len(c[0].token_ids) for c in greedy) / len(greedy),
        "mean_len_chars": sum(len(x) for x in texts) / len(texts),
        "judge_pairwise": s["pairwise_accuracy"], "judge_pairwise_se": _binomial_se(s["pairwise_accuracy"], s["pairs"]),
        "judge_five_best": s["five_best"],
        "judge_exact_match": s["exact_match"], "judge_spearman": s["spearman"],
        "judge_kendall_tau": s["kendall_tau"], "judge_pairs_tied": s["pairs_judge_tied"],
        "judge_pairs": s["pairs"], "judge_parse_failures": rm["parse_failures"], "judge_judgments": rm["judgments"],
        "examples": [{"prompt": t.prompt, "greedy": x, "answer": t.answer} for t, x in zip(tasks[:5], texts[:5])],
    }
