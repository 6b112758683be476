"""Verifiable instructions (issue 29): OASST first-turn prompts, each given one or two of IFEval's instruction
types, built and checked by if-verifiable's own classes (`if_verifiable.ifeval.instructions_registry`; the `real`
extra). The measure is IFEval's strict prompt-level accuracy, the library's `evaluate_instructions`: a response
counts when it follows every instruction of its prompt, as written (no loose variants).

    python -m selfreward.recipes.verifiable --oasst oasst.jsonl --out DIR [--held-out 300] [--train-draws 1] [--seed 0]
        # -> DIR/train.jsonl, DIR/heldout.jsonl: {id, prompt, instruction_id_list, kwargs}
    python train/rl.py ... --data DIR/train.jsonl --reward ifeval --reward-template DIR/train.jsonl

The held-out trees (recipes.oasst.split_groups, the same split as `recipes.oasst` with the same --eval-frac and
--seed) give the held-out prompts; when they are fewer than --held-out, they are drawn again, a round of one new
draw per prompt at a time (ids PROMPT_ID:ROUND; an item drawn before is skipped), until there are --held-out items:
items of one prompt share its text, and the SE treats them as independent.
"""

import copy
import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

from selfreward import cli
from selfreward.provenance import check_not_input, claim, made_by
from selfreward.records import DataError, field, nonempty, read_jsonl, write_jsonl
from selfreward.recipes.oasst import kept, load_messages, split_groups

# The instruction types used: every type of the registry whose check runs offline (tests/test_verifiable.py
# checks each status). Left out: NEEDS_NLTK_DATA, whose checks load nltk's punkt / punkt_tab sentence and word
# tokenizers, data that no package registry serves.
OFFLINE = ("keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
           "language:response_language", "length_constraints:number_paragraphs", "length_constraints:number_words",
           "length_constraints:nth_paragraph_first_word", "detectable_content:number_placeholders",
           "detectable_content:postscript", "detectable_format:number_bullet_lists",
           "detectable_format:constrained_response", "detectable_format:number_highlighted_sections",
           "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title",
           "combination:two_responses", "combination:repeat_prompt", "startend:end_checker",
           "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma",
           "startend:quotation")
NEEDS_NLTK_DATA = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
REPEAT = "combination:repeat_prompt"     # its kwarg is the request to repeat: the prompt's original text


@functools.cache
def registry() -> tuple[dict, dict]:
    """(instruction id -> if-verifiable's checker class, id -> the ids it conflicts with, made symmetric by the
    library's conflict_make). langdetect (the language checks) is seeded: the same response, the same verdict."""
    try:
        from if_verifiable.ifeval import instructions, instructions_registry as reg
    except ImportError as e:
        raise cli.ConfigError(f"verifiable instructions need if-verifiable ({e}): pip install 'selfreward[real]'")
    instructions.langdetect.DetectorFactory.seed = 0
    return reg.INSTRUCTION_DICT, reg.conflict_make(copy.deepcopy(reg.INSTRUCTION_CONFLICTS))


def describe(iid: str, rng: random.Random, text: str, tries: int = 100) -> tuple[str, dict]:
    """The library's instruction text for `iid` and the kwargs it drew (its own random choices, under a seed from
    `rng`; Python's global random state is restored) -> (text, kwargs). Drawn again until the kwargs rebuild the
    same text without a random choice, so the checker strict_ok builds from the record is the one the prompt
    states (the library's nth_paragraph_first_word can draw paragraph n + 1 of n, which its kwargs do not rebuild)."""
    cls = registry()[0][iid]
    state = random.getstate()
    try:
        for _ in range(tries):
            random.seed(rng.getrandbits(64))
            checker = cls(iid)
            desc = checker.build_description(prompt_to_repeat=text) if iid == REPEAT else checker.build_description()
            kwargs, drawn = checker.get_instruction_args() or {}, random.getstate()
            if cls(iid).build_description(**kwargs) == desc and random.getstate() == drawn:   # nothing redrawn
                return desc, kwargs
    finally:
        random.setstate(state)
    raise RuntimeError(f"{iid}: {tries} draws, none whose kwargs rebuild its text")


def attach(prompts: list[dict], rng: random.Random, per_prompt: tuple[int, int] = (1, 2),
           ids: tuple[str, ...] = OFFLINE) -> list[dict]:
    """Each {"id", "prompt"} given k ~ U{per_prompt} instructions from `ids`, no two of them conflicting in the
    registry (fewer when none is left) -> {id, prompt: the text, a blank line, the instruction texts;
    instruction_id_list, kwargs}."""
    conflicts = registry()[1]
    out = []
    for p in prompts:
        chosen: list[str] = []
        for _ in range(rng.randint(*per_prompt)):
            pool = [i for i in ids if not any(i in conflicts[c] for c in chosen)]
            if pool:
                chosen.append(rng.choice(pool))
        texts, kwargs = zip(*(describe(i, rng, p["prompt"]) for i in chosen))
        out.append({"id": p["id"], "prompt": p["prompt"] + "\n\n" + " ".join(texts),
                    "instruction_id_list": chosen, "kwargs": list(kwargs)})
    return out


def scores(record: dict, response: str):
    """if-verifiable's EvaluationScores of `response` against every instruction of `record` (binary_strict: all
    followed as written; partial_strict: the share followed)."""
    from if_verifiable.common import evaluate_instructions
    ids = record["instruction_id_list"]
    unknown = [i for i in ids if i not in registry()[0]]
    if unknown:                                # the library would skip them: a verdict on the rest only
        raise DataError(f"record {record.get('id')!r}: instruction types if-verifiable does not have: {unknown}")
    return evaluate_instructions(response, ids, record["kwargs"], record["prompt"], registry()[0])[1]


def strict_ok(record: dict, response: str) -> bool:
    """IFEval's strict prompt-level verdict by if-verifiable: every instruction of `record` followed."""
    return scores(record, response).binary_strict == 1.0


def accuracy(records: list[dict], responses: list[str]) -> tuple[float, float, list]:
    """Strict prompt-level accuracy, its SE sqrt(p (1 - p) / n), and each response's EvaluationScores."""
    if len(records) != len(responses) or not records:
        raise ValueError(f"{len(records)} records and {len(responses)} responses: need as many, at least one")
    sc = [scores(r, s) for r, s in zip(records, responses)]
    p = sum(x.binary_strict == 1.0 for x in sc) / len(records)
    return p, math.sqrt(p * (1 - p) / len(records)), sc


def check_records(records: list[dict], where: str) -> dict[str, dict]:
    """Records with known instruction ids and one kwargs dict each -> {prompt text: record}; a prompt text that
    two records give different instructions is an error (the reward sees only the text)."""
    known, by_prompt = registry()[0], {}
    for n, r in enumerate(records):
        w = f"{where}: record {n}"
        ids, kw = field(r, "instruction_id_list", w, list), field(r, "kwargs", w, list)
        if len(ids) != len(kw) or any(i not in known for i in ids) or not all(isinstance(k, dict) for k in kw):
            raise DataError(f"{w}: instruction_id_list must name if-verifiable's IFEval types, with one kwargs "
                            f"object each (got {ids}, {len(kw)} kwargs)")
        old = by_prompt.setdefault(field(r, "prompt", w), r)
        if (old["instruction_id_list"], old["kwargs"]) != (ids, kw):
            raise DataError(f"{w}: its prompt text is another record's, with other instructions")
    return by_prompt


def partial_reward(path=None, template=None, device=None, dtype=None):
    """`--reward ifeval-partial`: as `reward`, the share of the prompt's instructions followed (if-verifiable's
    partial_strict: 1.0 exactly when strict_ok), a denser signal than the strict verdict."""
    return reward(path, template, partial=True)


def reward(path=None, template=None, device=None, dtype=None, partial: bool = False):
    """`--reward ifeval --reward-template RECORDS.jsonl` (train/rl.py's REWARDS; `template` may also be a list of
    records): (prompts, responses) -> 1.0 when strict_ok, else 0.0 (partial: the share followed); each prompt is
    found by its text among the records. Takes no model: the other arguments are unused."""
    if not template:
        raise cli.ConfigError("--reward ifeval needs --reward-template: the records JSONL "
                              "(python -m selfreward.recipes.verifiable wrote it)")
    recs = template if isinstance(template, list) else nonempty(read_jsonl(template), template)
    by_prompt = check_records(recs, "records" if isinstance(template, list) else str(template))

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        bad = next((p for p in prompts if p not in by_prompt), None)
        if bad is not None:
            raise ValueError(f"a prompt that is in no record: {bad[:60]!r}")
        if partial:
            return [scores(by_prompt[p], r).partial_strict for p, r in zip(prompts, responses)]
        return [float(strict_ok(by_prompt[p], r)) for p, r in zip(prompts, responses)]
    return score


@dataclass
class VerifiableConfig:
    oasst: str = cli.input_file("")   # the OASST export: trees or the flat message table (recipes.oasst)
    out: str = cli.passive("")        # the folder written: train.jsonl, heldout.jsonl
    held_out: int = 300               # held-out items at least: more draws per held-out prompt when too few
    train_draws: int = 1              # instruction draws per training prompt (items PROMPT_ID:ROUND after the first)
    eval_frac: float = 0.25           # share of the trees held out (by a hash of the root id, as recipes.oasst)
    seed: int = 0                     # the split (as recipes.oasst's) and the instruction draws


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(VerifiableConfig, __doc__)
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder made from another input "
                   "or with other settings")
    a = p.parse_args(argv)
    cfg = cli.build(VerifiableConfig, a)
    if not cfg.oasst or not cfg.out:
        raise cli.ConfigError("--oasst and --out are required")
    if cfg.held_out < 1:
        raise cli.ConfigError(f"--held-out {cfg.held_out}: must be >= 1")
    out, names = Path(cfg.out), ["train.jsonl", "heldout.jsonl"]
    check_not_input([cfg.oasst], [out / n for n in names])
    roots = nonempty(load_messages(cfg.oasst), cfg.oasst, "Open Assistant messages")
    registry()
    with claim(out, made_by(cfg), overwrite=a.overwrite, folder=True,
               clear=lambda: [(out / n).unlink(missing_ok=True) for n in names]):
        return _write(cfg, roots, out)


def first_turns(roots) -> list[dict]:
    """English first-turn prompts {id, prompt}, one per distinct text (the first)."""
    texts: dict[str, str] = {}
    for r in roots:
        if r.role == "prompter" and kept(r, "en") and r.text.strip():
            texts.setdefault(r.text, r.id)
    return [{"id": i, "prompt": t} for t, i in texts.items()]


def draws(prompts: list[dict], rng: random.Random, n: int) -> list[dict]:
    """Rounds of one instruction draw per prompt (attach) until there are n items, or the rounds stop giving new
    ones: ids PROMPT_ID:ROUND after the first round; an item drawn before (same instructions, same kwargs) is
    skipped."""
    out, seen = [], set()
    for d in range(4 * math.ceil(n / len(prompts))):
        if len(out) >= n:
            break
        for r in attach(prompts, rng):
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                out.append({**r, "id": f"{r['id']}:{d}" if d else r["id"]})
    return out


def _write(cfg: VerifiableConfig, roots: list, out: Path) -> dict:
    train_roots, held_roots = split_groups(roots, cfg.eval_frac, cfg.seed, lambda r: r.id)
    train, held = first_turns(train_roots), first_turns(held_roots)
    if not train or not held:
        raise DataError(f"{cfg.oasst}: {len(train)} training and {len(held)} held-out English first-turn prompts "
                        f"(--eval-frac {cfg.eval_frac}): need at least one of each")
    train_recs = draws(train, random.Random(f"{cfg.seed}:train"), cfg.train_draws * len(train))
    held_recs = draws(held, random.Random(f"{cfg.seed}:heldout"), cfg.held_out)
    write_jsonl(out / "train.jsonl", train_recs)
    write_jsonl(out / "heldout.jsonl", held_recs)
    counts = {"trees": len(roots), "train": len(train_recs), "heldout_prompts": len(held),
              "heldout": len(held_recs)}
    for k, v in counts.items():
        print(f"{k:>24}: {v}")
    return counts


if __name__ == "__main__":
    cli.run_main(main)
