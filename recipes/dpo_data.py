"""What an iteration's DPO trains on besides its pairs: the SFT mix (--sft-mix), judge self-training records
(--judge-self-train) and judge pairs from meta-judging (--meta-judge; recipes/meta_judge.py)."""

import random
from pathlib import Path

from selfreward.recipes import pipeline
from selfreward.recipes.judge import judge_prompt
from selfreward.records import field as rfield, iter_jsonl, read_json, read_jsonl, write_json, write_jsonl


def write_sft_mix(cfg, it: Path) -> Path:
    """iter_t/sft_mix.jsonl: each record of cfg.sft_mix ({"prompt", "response"}) sft_mix_repeat times as a
    DPO record whose chosen and rejected are its response. The DPO margin of such a record is zero whatever
    the weights (no DPO gradient); what it trains is the chosen NLL term, nll_alpha x its per-token NLL."""
    out = it / "sft_mix.jsonl"
    if not out.exists():
        recs = [{"prompt": rfield(r, "prompt", f"{cfg.sft_mix}:{i}"),
                 "chosen": rfield(r, "response", f"{cfg.sft_mix}:{i}"), "rejected": r["response"], "sft_only": True}
                for i, r in iter_jsonl(cfg.sft_mix)]
        write_jsonl(out, recs * cfg.sft_mix_repeat)
    return out


def write_judge_self(cfg, t: int) -> Path:
    """iter_t/judge_self.jsonl: judge self-training records from the iteration's own judgments. For each text a
    pair uses (its chosen and its rejected side), the judgments of that text count when all of them give the
    same score and none had its prompt cut; the first one becomes an NLL-only record whose prompt is the judge
    prompt of that text (chosen == rejected: no DPO gradient, only the NLL term). At most n // 2 come from
    chosen texts and n - n // 2 from rejected ones, drawn in a seeded order; fewer when fewer qualify."""
    it = pipeline.folder(cfg, t)
    out = it / "judge_self.jsonl"
    if out.exists():
        return out
    text = {(c["id"], c["sample"]): c["text"] for c in read_jsonl(it / "candidates.jsonl")}
    by_text: dict[tuple, list[dict]] = {}
    for j in read_jsonl(it / "judgments.jsonl"):
        by_text.setdefault((j["id"], text.get((j["id"], j["sample"]))), []).append(j)
    sides: dict[str, list[dict]] = {"chosen": [], "rejected": []}
    seen = set()
    for p in read_jsonl(it / "pairs.jsonl"):
        for side in sides:
            key = (p["id"], p[side])
            js = by_text.get(key, [])
            if key in seen or not js or len({j["score"] for j in js}) != 1 or any(j["prompt_cut"] for j in js):
                continue
            seen.add(key)
            sides[side].append({"prompt": judge_prompt(cfg.judge.text, p["prompt"], p[side]),
                                "chosen": js[0]["judgment"], "rejected": js[0]["judgment"], "sft_only": True})
    rng, n = random.Random(pipeline.seed(cfg, t, 5)), cfg.judge_self_train
    for recs in sides.values():
        rng.shuffle(recs)
    chosen, rejected = sides["chosen"][:n // 2], sides["rejected"][:n - n // 2]
    print(f"[judge self-train] iter {t}: {len(chosen) + len(rejected)} records ({len(chosen)} of "
          f"{len(sides['chosen'])} chosen texts, {len(rejected)} of {len(sides['rejected'])} rejected)", flush=True)
    write_jsonl(out, chosen + rejected)
    return out


def write_judge_pairs(cfg, t: int) -> tuple[Path, dict]:
    """iter_t/judge_pairs.jsonl: the meta-judge's judge preference pairs (recipes.meta_judge.judge_pairs), DPO
    records beside the actor's pairs; their counts in judge_pairs.jsonl.meta.json (the manifest's "meta")."""
    from selfreward.recipes.meta_judge import judge_pairs
    it = pipeline.folder(cfg, t)
    out, meta = it / "judge_pairs.jsonl", it / "judge_pairs.jsonl.meta.json"
    if out.exists() and meta.exists():
        return out, read_json(meta)
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(it / "prompts.jsonl")}
    texts = {(c["id"], c["sample"]): c["text"] for c in read_jsonl(it / "candidates.jsonl")}
    pairs, counts = judge_pairs(prompts, texts, read_jsonl(it / "judgments.jsonl"),
                                read_jsonl(it / "meta_judgments.jsonl", made_by="the meta_judge stage"), cfg.judge.text)
    print(f"[meta-judge] iter {t}: {counts['judge_pairs']} judge pairs from {counts['responses_compared']} responses "
          f"({counts['meta_ties']} ties, {counts['meta_parse_failures']}/{counts['meta_verdicts']} unparsable, "
          f"position bias {counts['meta_position_bias']})", flush=True)
    write_jsonl(out, pairs)
    write_json(meta, counts)
    return out, counts
