"""Answers read from the next-token distribution: a forced text, then a fixed set of options ("1"/"2",
"1".."10"); and the engine's prefix-cache counters over a block of work. Used by recipes/rlaif.py."""
from __future__ import annotations

import math


def forced_options(tok, text: str, options: list[str]) -> tuple[list[int], list[list[int]]]:
    """Ids of `text` as the tokenizer writes it before an option, and each option's own tokens: the encodings
    of text + ' ' + option share a head; what follows is the option's token sequence."""
    encs = [tok.encode(f"{text} {o}") for o in options]
    n = 0
    while all(len(e) > n for e in encs) and len({e[n] for e in encs}) == 1:
        n += 1
    tails = [e[n:] for e in encs]
    if any(not t for t in tails):   # e.g. a tokenizer that writes the options as one unknown token
        from selfreward.recipes.judge import TemplateError
        raise TemplateError(f"the labeller's tokenizer gives an option of {options} no token of its own after "
                            f"{text!r} (the options read the same); use a checkpoint whose tokenizer writes them, "
                            f"or a template whose ending they follow (--template)")
    return encs[0][:n], tails


def option_probs(engine, prompts: list[list[int]], tails: list[list[int]]) -> list[list[float]]:
    """[B][C] probabilities over the options after each prompt (renormalised over the options). Every option
    one token: one next-token read. Otherwise each option's tokens are teacher-forced and summed, and an
    option that is a token prefix of others loses their probability (see the module docstring)."""
    if all(len(t) == 1 for t in tails):
        rows = engine.next_token_logprobs(prompts, [t[0] for t in tails]).double().tolist()   # [B, C]
    else:
        C = len(tails)
        flat = engine.score([p for p in prompts for _ in tails], [t for _ in prompts for t in tails])
        rows = [[sum(flat[i * C + c]) for c in range(C)] for i in range(len(prompts))]
    out = []
    for row in rows:
        p = [math.exp(x) for x in row]
        p = [max(0.0, p[c] - sum(p[d] for d in range(len(tails)) if d != c and len(tails[d]) > len(tails[c])
                                 and tails[d][:len(tails[c])] == tails[c])) for c in range(len(tails))]
        z = sum(p)
        out.append([x / z for x in p] if z > 0 else [1.0 / len(p)] * len(p))
    return out


class PrefillMeter:
    """The engine's own prefix-cache counters over a block of work: prefill computed vs served from cache."""

    def __init__(self, engine):
        self.engine, self.start = engine, dict(engine.stats)

    def read(self) -> dict:
        s = self.engine.stats
        comp = s["prefill_computed"] - self.start["prefill_computed"]
        hit = s["prefix_hit"] - self.start["prefix_hit"]
        return {"prefill_computed": comp, "prefix_hit": hit, "saved": hit / (comp + hit) if comp + hit else None}
