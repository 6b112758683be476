"""Seed data from Open Assistant exports: IFT pairs, human-ranked groups (train / held-out), EFT examples
(recipes/README.md, "Seed data"). The tree export and the flat message table (`message_id`, `parent_id`,
`role`, `lang`, `text`, `rank`: the hub's parquet too) are detected from the first record and read into the
same `Node` trees.

    python -m selfreward.recipes.oasst --input oasst.jsonl --out data/seed [--lang en] [--eval-frac 0.25]
        [--eft-model DIR --tries 1]       # also the EFT examples, judged by that model (recipes.judge)
"""

import hashlib
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field as dfield
from pathlib import Path
from typing import Callable

from selfreward import cli
from selfreward.provenance import check_not_input, claim, file_hash, made_by
from selfreward.records import DataError, field, nonempty, write_jsonl
from selfreward.train.layouts import iter_rows


@dataclass
class Node:
    id: str
    role: str                       # "prompter" | "assistant"
    text: str
    lang: str | None = None
    rank: int | None = None
    deleted: bool = False
    replies: list["Node"] = dfield(default_factory=list)


def _rank(v, where: str) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
        raise DataError(f"{where}: field 'rank' should be a non-negative integer or null, got {v!r}")
    return int(v)


def _node(m: dict, where: str) -> Node:
    role = field(m, "role", where)
    if role not in ("prompter", "assistant"):
        raise DataError(f"{where}: field 'role' should be 'prompter' or 'assistant', got {role!r}")
    return Node(id=str(field(m, "message_id", where)), role=role, text=field(m, "text", where),
                lang=m.get("lang"), rank=_rank(m.get("rank"), where), deleted=bool(m.get("deleted", False)),
                replies=[_node(c, where) for c in field(m, "replies", where, list)] if "replies" in m else [])


def load_messages(path: str | Path) -> list[Node]:
    """Root prompter nodes, in file order, from either export format."""
    roots: list[Node] = []
    flat: dict[str, Node] = {}
    parents: list[tuple[str, str | None, str]] = []
    fmt = None
    for where, rec in iter_rows(path):
        kind = "tree" if isinstance(rec.get("prompt"), dict) else "flat" if "message_id" in rec else None
        if kind is None:
            raise DataError(f"{where}: neither a tree record (field 'prompt' with replies) nor a flat message "
                            f"(field 'message_id')")
        if fmt and kind != fmt:
            raise DataError(f"{where}: a {kind} record in a file of {fmt} records")
        fmt = kind
        if kind == "tree":
            roots.append(_node(rec["prompt"], where))
        else:
            n = _node(rec, where)
            if n.id in flat:
                raise DataError(f"{where}: duplicate message_id {n.id!r}")
            flat[n.id] = n
            parents.append((n.id, rec.get("parent_id"), where))
    for mid, pid, where in parents:  # children keep file order
        if pid is None:
            roots.append(flat[mid])
        elif pid not in flat:
            raise DataError(f"{where}: field 'parent_id' names {pid!r}, which is not in the file")
        else:
            flat[pid].replies.append(flat[mid])
    return roots


def walk(nodes: list[Node]):
    for n in nodes:
        yield n
        yield from walk(n.replies)


def kept(n: Node, lang: str | None) -> bool:
    """Not deleted, and in `lang` (None: any language)."""
    return not n.deleted and (lang is None or n.lang == lang)


def ift_pairs(roots: list[Node], lang: str | None = "en") -> list[dict]:
    """First-turn (prompt, human rank-0 assistant reply), both kept in `lang`."""
    out = []
    for r in roots:
        best = [c for c in r.replies if c.role == "assistant" and c.rank == 0 and kept(c, lang)]
        if r.role == "prompter" and kept(r, lang) and best:
            out.append({"id": r.id, "prompt": r.text, "response": best[0].text, "source": "oasst"})
    return out


def ranked_groups(roots: list[Node], lang: str | None = "en", first_turn_only: bool = True) -> list[dict]:
    """Prompts with 2+ human-ranked assistant replies: {id, prompt, replies: [{text, rank}]}.
    Deeper groups (first_turn_only=False) carry the conversation so far as a transcript in `prompt`."""
    out = []

    def visit(n: Node, path: list[Node]) -> None:
        path = path + [n]
        if n.role == "prompter" and kept(n, lang):
            ranked = [c for c in n.replies if c.role == "assistant" and c.rank is not None and kept(c, lang)]
            if len(ranked) >= 2:
                ranked.sort(key=lambda c: c.rank)
                talk = "\n\n".join(f"{'User' if m.role == 'prompter' else 'Assistant'}: {m.text}" for m in path)
                out.append({"id": n.id, "prompt": n.text if len(path) == 1 else talk,
                            "turn": len(path) // 2 + 1,
                            "replies": [{"text": c.text, "rank": c.rank} for c in ranked]})
        for c in [] if first_turn_only else n.replies:
            if kept(c, lang):
                visit(c, path)

    for r in roots:
        if r.role == "prompter":
            visit(r, [])
    return out


def held_out(key: str, frac: float, seed: int) -> bool:
    """Whether `key` falls in the share `frac`, by a hash of (seed, key): stable when items are added or reordered."""
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12 < frac


def split_groups(items: list, eval_frac: float = 0.25, seed: int = 0, key=lambda g: g["id"]) -> tuple[list, list]:
    """Train / held-out items by held_out(key(item)); the CLI splits trees (a first-turn group's id is its root's)."""
    return ([g for g in items if not held_out(key(g), eval_frac, seed)],
            [g for g in items if held_out(key(g), eval_frac, seed)])


def agrees_with_humans(ranks: list[int], scores: list[float | None]) -> bool:
    """True when every pair the humans ordered is ordered the same way, strictly, by the scores."""
    if any(s is None for s in scores):
        return False
    n = len(ranks)
    return all((ranks[i] < ranks[j]) == (scores[i] > scores[j])
               for i in range(n) for j in range(n) if ranks[i] != ranks[j])


# judge_fn(list of (instruction, response)) -> list of (judge prompt text, judgment text, score or None)
JudgeFn = Callable[[list[tuple[str, str]]], list[tuple[str, str, float | None]]]


def build_eft(groups: list[dict], judge_fn: JudgeFn, tries: int = 1, downsample: bool = True,
              seed: int = 0) -> tuple[list[dict], dict]:
    """EFT examples (recipes/README.md, "Seed data"): a group's judgments of its first try that orders its replies
    as the humans did; then the most common score down-sampled to the next one's count. -> (examples, stats)"""
    examples: list[dict] = []
    stats = Counter(groups=len(groups), judgments=0, unparsable=0, groups_kept=0)
    for g in groups:
        items = [(g["prompt"], r["text"]) for r in g["replies"]]
        ranks = [r["rank"] for r in g["replies"]]
        for _ in range(tries):
            judged = judge_fn(items)
            stats["judgments"] += len(judged)
            stats["unparsable"] += sum(s is None for _, _, s in judged)
            if agrees_with_humans(ranks, [s for _, _, s in judged]):
                stats["groups_kept"] += 1
                examples += [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": j}],
                              "score": s, "group": g["id"], "rank": rk} for (p, j, s), rk in zip(judged, ranks)]
                break
    hist = Counter(e["score"] for e in examples)
    stats["examples_before_downsample"] = len(examples)
    if downsample and len(hist) >= 2:
        (top, n_top), (_, n_next) = hist.most_common(2)
        idx = [i for i, e in enumerate(examples) if e["score"] == top]
        drop = set(random.Random(seed).sample(idx, n_top - n_next))
        examples = [e for i, e in enumerate(examples) if i not in drop]
        stats["downsampled_score"], stats["downsampled_dropped"] = top, len(drop)
    stats["examples"], hist = len(examples), Counter(e["score"] for e in examples)
    return examples, {**stats, "score_histogram": {str(k): v for k, v in sorted(hist.items())}}


def eft_judge(model_dir: str | Path, cfg) -> JudgeFn:
    """build_eft's judge from a checkpoint and a JudgeConfig of k=1 (recipes.judge.judge_items): call c's item j
    seeded seed + 100_003 * c + j."""
    from selfreward.recipes.judge import judge_items, judge_prompt
    from selfreward.recipes.session import Session
    engine, tok = Session().get(str(model_dir))
    calls = itertools.count(1)

    def fn(items: list[tuple[str, str]]) -> list[tuple[str, str, float | None]]:
        base = cfg.seed + 100_003 * next(calls)
        res = judge_items(engine, tok, items, cfg, [base + j for j in range(len(items))])
        return [(judge_prompt(cfg.text, i, r), *j.samples[0]) for (i, r), j in zip(items, res)]
    return fn


@dataclass
class OasstConfig:
    input: str = cli.input_file("")   # the export: trees or the flat message table
    out: str = cli.passive("")        # the folder written: ift, groups_{train,eval}, eft_* (.jsonl; see above)
    lang: str = "en"                  # language filter; "any" for none
    eval_frac: float = 0.25           # share of the trees held out (by a hash of the root id)
    all_turns: bool = False           # ranked groups at every depth, not only turn 1
    seed: int = 0
    eft_model: str = cli.checkpoint("")   # the checkpoint that writes the EFT judgments ("" = no EFT)
    judge_template: str = "default"   # judge rubric: a file or a built-in name (recipes/judge.py)
    tries: int = 1                    # EFT: judgings of a group until one orders it as the humans did
    temperature: float = 0.7
    max_tokens: int = 256


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(OasstConfig, __doc__)
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder made from another input "
                   "or with other settings")
    a = p.parse_args(argv)
    cfg = cli.build(OasstConfig, a)
    if not cfg.input or not cfg.out:
        raise cli.ConfigError("--input and --out are required")
    lang, out = None if cfg.lang == "any" else cfg.lang, Path(cfg.out)
    names = ["ift.jsonl", "groups_train.jsonl", "groups_eval.jsonl", "eft_train.jsonl", "eft_eval.jsonl"]
    check_not_input([cfg.input, cfg.judge_template], [out / n for n in names])
    roots = nonempty(load_messages(cfg.input), cfg.input, "Open Assistant messages")
    if lang is not None and not any(n.lang == lang for n in walk(roots)):
        have = ", ".join(f"{k} ({v})" for k, v in Counter(n.lang for n in walk(roots)).most_common(8))
        raise DataError(f"--lang {cfg.lang}: no message matched (languages in the file: {have}); "
                        f"codes are lower case, or pass --lang any")
    tmpl = cfg.judge_template
    made = {**made_by(cfg), "judge_template": file_hash(tmpl) if Path(tmpl).is_file() else tmpl}
    with claim(out, made, overwrite=a.overwrite, folder=True,
               clear=lambda: [(out / n).unlink(missing_ok=True) for n in names]):
        return _write(cfg, lang, roots, out)


def _write(a: OasstConfig, lang: str | None, roots: list[Node], out: Path) -> dict:
    train_roots, held_roots = split_groups(roots, a.eval_frac, a.seed, lambda r: r.id)  # trees: nothing held-out trains
    ift = ift_pairs(train_roots, lang)
    train = ranked_groups(train_roots, lang, not a.all_turns)
    held = ranked_groups(held_roots, lang, not a.all_turns)
    if not ift and not train and not held:
        raise DataError(f"{a.input}: no IFT pair and no ranked group (no rank-0 reply, or fewer than two ranked "
                        f"replies, in --lang {a.lang}); nothing written")
    for name, recs in (("ift", ift), ("groups_train", train), ("groups_eval", held)):
        write_jsonl(out / f"{name}.jsonl", recs)
    counts: dict = {"trees": len(roots), "trees_train": len(train_roots), "trees_eval": len(held_roots),
                    "ift": len(ift), "groups_train": len(train), "groups_eval": len(held)}
    if a.eft_model:
        from selfreward.recipes.judge import JudgeConfig
        fn = eft_judge(a.eft_model, JudgeConfig(k=1, temperature=a.temperature, max_tokens=a.max_tokens,
                                                seed=a.seed, template=a.judge_template))
        for name, gs in (("train", train), ("eval", held)):
            ex, st = build_eft(gs, fn, tries=a.tries, seed=a.seed)
            write_jsonl(out / f"eft_{name}.jsonl", ex)
            counts[f"eft_{name}"] = st
    for k, v in counts.items():
        print(f"{k:>14}: {v}")
    return counts


if __name__ == "__main__":
    cli.run_main(main)
