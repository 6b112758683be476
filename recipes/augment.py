"""Humpback's unlabelled side, the stages `segments` (recipes/segment.py) and `augment`: one instruction per
segment sampled from the backward model M_yx with the segment as the user turn (cut to fit: `output_cut`);
resumable and shardable, each segment seeded by its index.
"""

from dataclasses import dataclass

from selfreward import cli
from selfreward.recipes import pipeline
from selfreward.recipes.prompts import fit_prompt
from selfreward.recipes.segment import build_segments
from selfreward.recipes.session import Session
from selfreward.records import DataError, read_json, read_jsonl, write_jsonl


@dataclass
class AugmentConfig:
    temperature: float = 0.7          # paper: 0.7
    top_p: float = 0.9                # paper: 0.9
    max_tokens: int = 128             # instruction length limit


def stage_segments(cfg) -> dict:
    out = pipeline.folder(cfg, 0) / "segments.jsonl"
    if out.exists():
        return read_json(pipeline.folder(cfg, 0) / "manifest.json").get("segments", {})
    if not cfg.unlabelled:
        raise cli.ConfigError("--unlabelled is required (JSONL {\"text\"} or plain-text files)")
    segs, counts = build_segments(cfg.unlabelled, cfg.segment)
    print(f"[humpback] {counts['documents']} documents -> {counts['segments']} segments in "
          f"[{cfg.segment.min_chars}, {cfg.segment.max_chars}] chars ({counts['too_short']} too short); "
          f"{counts['exact_duplicates']} exact and {counts['near_duplicates']} near duplicates removed; "
          f"{counts['kept']} kept", flush=True)
    if not segs:
        raise DataError(f"{', '.join(cfg.unlabelled)}: no segment of {cfg.segment.min_chars}-"
                        f"{cfg.segment.max_chars} characters")
    write_jsonl(out, segs)
    return counts


def stage_augment(cfg, s: Session, rank: int = 0, world: int = 1) -> None:
    from selfreward.infer.sequence import SamplingParams
    out = pipeline.folder(cfg, 0) / "candidates.jsonl"
    if out.exists():
        return
    segs = read_jsonl(pipeline.folder(cfg, 0) / "segments.jsonl", made_by="the segments stage")
    engine, tok = s.get(str(pipeline.folder(cfg, 0) / "backward" / "model"))
    a, base = cfg.augment, pipeline.seed(cfg, 0, 2)
    budget = engine.max_len - a.max_tokens - 1

    def work(batch, emit):
        fitted = [fit_prompt(tok, "{y}", {"y": sg["text"]}, budget) for _, sg in batch]
        ps = [SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=base + i)
              for i, _ in batch]

        def done(j: int, comps) -> None:
            (i, sg), x = batch[j], comps[0]
            emit(i, [{"id": sg["id"], "instruction": x.text.strip(), "output": sg["text"], "source": sg["source"],
                      "n_tokens": len(x.token_ids), "finish_reason": x.finish_reason, "output_cut": fitted[j][1]}],
                 len(x.token_ids))
        engine.generate([f[0] for f in fitted], ps, on_request=done)
    pipeline.units(cfg, rank, world, out, segs, 1, lambda r: r["id"], work, "augment", "segments")
