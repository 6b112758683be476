"""Checkpoint selection: of the exports a DPO run wrote (`train/dpo.py --export-every N`), keep the one
that wins most often against the iteration's starting model M_t, judged head-to-head in both orders on
held-out prompts (Self-Rewarding LMs: checkpoints every 200 steps, the one with the most pairwise wins on
253 validation prompts becomes M_{t+1}; PAPER_NOTES section 1). The chosen folder is copied to --out
atomically, and the choice with every candidate's scores is returned (and written to --report) for the
iteration's manifest.

    python -m selfreward.recipes.select --candidates RUN/iter_1/dpo/exports/step_* --reference M1 \
        --judge M1 --prompts heldout.jsonl --out RUN/iter_1/model --report RUN/iter_1/select.json

Rule: the most wins; among equal wins the fewest losses; among those the LATER candidate in the given
order (the further-trained one, which is what the run would export without selection), so selection only
departs from the last checkpoint when an earlier one does strictly better.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field as dfield
from pathlib import Path

from selfreward.model.checkpoint import _atomic_dir_write
from selfreward.records import DataError, field, iter_jsonl, write_json
from selfreward.recipes.evaluate import PAIR_TEMPLATE, generate_responses, head_to_head


@dataclass
class SelectConfig:
    temperature: float = 0.0            # the responses: greedy by default, as recipes.evaluate h2h
    top_p: float = 1.0
    max_tokens: int = 256               # response tokens, and the judge's
    judge_temperature: float = 0.0
    seed: int = 0
    template: str = dfield(default=PAIR_TEMPLATE, repr=False)


def _load(path: str):
    from selfreward.infer.engine import Engine
    from selfreward.model.tokenizer import Tokenizer
    return Engine.from_pretrained(path=path), Tokenizer.load(path)


def _responses(path: str, prompts: list[str], cfg: SelectConfig) -> list[str]:
    engine, tok = _load(path)
    out = generate_responses(engine, tok, prompts, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed)
    del engine          # one model in memory at a time
    return out


def pick(scores: list[dict]) -> int:
    """Index of the chosen candidate: most wins, then fewest losses, then the later one."""
    return max(range(len(scores)), key=lambda i: (scores[i]["wins"], -scores[i]["losses"], i))


def select_checkpoint(candidates: list[str], reference: str, prompts: list[str], judge_model: str,
                      out: str | Path | None = None, cfg: SelectConfig | None = None) -> dict:
    """Judge each candidate against `reference` on `prompts` (recipes.evaluate.head_to_head: a win only
    when both orders prefer the candidate), choose by `pick`, copy the chosen folder to `out` (atomic).
    Returns {"chosen", "chosen_index", "rule", "reference", "judge", "n_prompts", "scores": [per candidate:
    candidate, wins, ties, losses, win, tie, loss (shares), no_verdict]}."""
    cfg = cfg or SelectConfig()
    if not candidates:
        raise DataError("select: no candidate checkpoints")
    if not prompts:
        raise DataError("select: no prompts to judge on")
    for c in [reference, judge_model, *candidates]:
        if not (Path(c) / "config.json").exists():
            raise DataError(f"{c}: not a checkpoint folder (no config.json)")
    ref = _responses(reference, prompts, cfg)
    cand = [_responses(c, prompts, cfg) for c in candidates]
    jeng, jtok = _load(judge_model)
    scores = []
    for c, resp in zip(candidates, cand):
        r = head_to_head(jeng, jtok, prompts, resp, ref, cfg.template, cfg.judge_temperature, cfg.max_tokens,
                         cfg.seed)
        n = r["n"]
        scores.append({"candidate": str(c), "wins": round(r["win"] * n), "ties": round(r["tie"] * n),
                       "losses": round(r["loss"] * n), "win": r["win"], "tie": r["tie"], "loss": r["loss"],
                       "no_verdict": r["no_verdict"]})
        print(f"[select] {c}: {scores[-1]['wins']} wins, {scores[-1]['ties']} ties, {scores[-1]['losses']} losses "
              f"of {n} against {reference}", flush=True)
    del jeng
    i = pick(scores)
    res = {"chosen": str(candidates[i]), "chosen_index": i, "reference": str(reference), "judge": str(judge_model),
           "n_prompts": len(prompts), "rule": "most wins, then fewest losses, then the later candidate",
           "scores": scores}
    if out is not None:
        src = Path(candidates[i])
        _atomic_dir_write(Path(out), lambda tmp: [shutil.copy2(p, tmp / p.name) for p in src.iterdir() if p.is_file()])
        res["out"] = str(out)
    return res


def main(argv: list[str] | None = None) -> dict | int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--candidates", nargs="+", required=True, help="checkpoint folders, in training order")
    ap.add_argument("--reference", required=True, help="M_t, the iteration's starting model")
    ap.add_argument("--judge", help="the judging checkpoint (default: --reference, as the self-judging loop)")
    ap.add_argument("--prompts", required=True, help="held-out JSONL with a 'prompt' field")
    ap.add_argument("--out", help="folder that receives a copy of the chosen checkpoint")
    ap.add_argument("--report", help="JSON file for the choice and every candidate's scores")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--pair-template", help="pairwise judge template file (see recipes/evaluate.py)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--judge-temperature", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        if not Path(a.prompts).is_file():
            raise DataError(f"{a.prompts}: no such file")
        prompts = [field(r, "prompt", f"{a.prompts}:{i}") for i, r in iter_jsonl(a.prompts)][:a.limit]
        tmpl = PAIR_TEMPLATE
        if a.pair_template:
            tmpl = Path(a.pair_template).read_text(encoding="utf-8")
            for slot in ("{instruction}", "{response_1}", "{response_2}"):
                if slot not in tmpl:
                    raise DataError(f"{a.pair_template}: pair template lacks placeholder {slot}")
        cfg = SelectConfig(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                           judge_temperature=a.judge_temperature, seed=a.seed, template=tmpl)
        res = select_checkpoint(a.candidates, a.reference, prompts, a.judge or a.reference, a.out, cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.report:
        write_json(a.report, res)
    print(f"[select] chosen: {res['chosen']} ({res['rule']})" + (f" -> {a.out}" if a.out else ""))
    return res


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
