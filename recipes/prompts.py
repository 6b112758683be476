"""Prompts of the judging recipes (judge, rlaif, h2h, augment) and answers read from them: {slot} templates,
filled in one pass (a value is never substituted again; other braces are left alone), sent as one user turn
and fitted to the context; forced choices, the next-token probabilities of a few options after a forced start.
"""

import math
import re
from dataclasses import fields, replace
from pathlib import Path

from selfreward.records import DataError, read_json

_SLOT = re.compile(r"\{(\w+)\}")


class TemplateError(DataError):
    pass


def fill(template: str, **vals: str) -> str:
    return _SLOT.sub(lambda m: vals.get(m.group(1), m.group(0)), template)


def check_slots(text: str, slots: tuple[str, ...], where: str) -> None:
    missing = [f"{{{s}}}" for s in slots if f"{{{s}}}" not in text]
    if missing:
        raise TemplateError(f"{where} lacks placeholder {', '.join(missing)} "
                            f"(it needs {' and '.join(f'{{{s}}}' for s in slots)})")


def load_template(path: str | Path | None, default, slots: tuple[str, ...], what: str = "template",
                  builtin: dict[str, str] | None = None):
    """`default` when `path` is None; a built-in by name (an existing file wins); else the file: plain text
    holding every slot, or, where `default` is a dataclass of texts, a JSON object with some of its fields
    (its `sample` holding every slot)."""
    if path is None:
        return default
    if builtin and str(path) in builtin and not Path(path).exists():
        return builtin[str(path)]
    if not Path(path).is_file():
        raise TemplateError(f"{path}: no such {what} file" + (f" (built-in names: {', '.join(builtin)})"
                                                             if builtin else ""))
    if isinstance(default, str):
        text = Path(path).read_text(encoding="utf-8")
        check_slots(text, slots, f"{path}: {what}")
        return text
    raw = read_json(path, error=TemplateError)
    known = {f.name for f in fields(default)}
    bad = [k for k in raw if k not in known or not isinstance(raw[k], str)] if isinstance(raw, dict) else ["?"]
    if bad:
        raise TemplateError(f"{path}: field '{bad[0]}' is not a text field of {type(default).__name__} "
                            f"({sorted(known)})")
    t = replace(default, **raw)
    check_slots(t.sample, slots, f"{path}: field 'sample'")
    return t


def fit_prompt(tok, template: str, vals: dict[str, str], budget: int, system: str | None = None
               ) -> tuple[list[int], bool]:
    """Chat ids of the filled template, at most `budget` tokens, the longest slot value cut until it fits.
    Returns (ids, was_cut)."""
    ids_of = lambda v: tok.user_ids(fill(template, **v), system)  # noqa: E731
    ids = ids_of(vals)
    if len(ids) <= budget:
        return ids, False
    empty = len(ids_of({k: "" for k in vals}))
    if empty + 8 > budget:
        raise TemplateError(f"the template alone takes {empty} tokens; the prompt budget is {budget} (the "
                            f"context less the tokens to generate): use a shorter template or fewer max tokens")
    cur = dict(vals)
    chars_per_token = max(1.0, sum(map(len, vals.values())) / max(1, len(ids) - empty))
    for _ in range(60):
        over = len(ids) - budget
        if over <= 0:
            return ids, True
        k = max(cur, key=lambda k: len(cur[k]))
        cut = max(4, int((over + 4) * chars_per_token))  # about the excess, plus room for the ' [...]' mark
        cur[k] = cur[k][:max(0, len(cur[k]) - cut)]
        ids = ids_of({k: v + " [...]" if v != vals[k] else v for k, v in cur.items()})
    raise TemplateError("could not fit the prompt into the context")


def forced_options(tok, text: str, options: list[str]) -> tuple[list[int], list[list[int]]]:
    """Ids of `text` as the tokenizer writes it before an option, and each option's own tokens: the encodings
    of text + ' ' + option share a head; what follows is the option's token sequence."""
    encs = [tok.encode(f"{text} {o}") for o in options]
    n = 0
    while all(len(e) > n for e in encs) and len({e[n] for e in encs}) == 1:
        n += 1
    tails = [e[n:] for e in encs]
    if any(not t for t in tails):   # e.g. a tokenizer that writes the options as one unknown token
        raise TemplateError(f"the model's tokenizer gives an option of {options} no token of its own after "
                            f"{text!r} (the options read the same); use a checkpoint whose tokenizer writes them, "
                            f"or a template whose ending they follow")
    return encs[0][:n], tails


def option_probs(engine, tok, prompts: list[list[int]], forced: str | list[str], options: list[str]
                 ) -> list[list[float]]:
    """[B][C] probabilities of `options` after each prompt (chat ids ending in the generation prompt) with the
    assistant turn forced to begin with `forced` (one text for all, or one per prompt). Prompts whose options
    are one token each are read in one next-token pass; others by teacher forcing each option's tokens."""
    forced = [forced] * len(prompts) if isinstance(forced, str) else forced
    split = {t: forced_options(tok, t, options) for t in set(forced)}
    groups: dict[tuple, list[int]] = {}          # one batched read per distinct set of option tails
    for i, t in enumerate(forced):
        groups.setdefault(tuple(map(tuple, split[t][1])), []).append(i)
    out: list[list[float]] = [[]] * len(prompts)
    for tails, idx in groups.items():
        full = [prompts[i] + split[forced[i]][0] for i in idx]
        if all(len(t) == 1 for t in tails):
            rows = engine.next_token_logprobs(full, [t[0] for t in tails]).double().tolist()   # [B, C]
        else:
            flat = engine.score([f for f in full for _ in tails], [list(t) for _ in full for t in tails])
            rows = [[sum(flat[j * len(tails) + c]) for c in range(len(tails))] for j in range(len(full))]
        for i, row in zip(idx, rows):
            out[i] = _renormalise(row, tails)
    return out


def _renormalise(logp: list[float], tails) -> list[float]:
    """P(option) renormalised over the options; an option that is a prefix of another ("1" of "10") counts
    only where that other does not continue it, so the options are disjoint."""
    m = max(logp)
    p = [math.exp(x - m) if m > -math.inf else 0.0 for x in logp]
    p = [max(0.0, p[c] - sum(p[d] for d, t in enumerate(tails) if len(t) > len(tails[c])
                             and t[:len(tails[c])] == tails[c])) for c in range(len(tails))]
    z = sum(p)
    return [x / z for x in p] if z > 0 else [1.0 / len(p)] * len(p)
