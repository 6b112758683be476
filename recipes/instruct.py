"""Self-instruct prompts: 8-shot generation (6 seed + 2 generated earlier; plain text, BOS + numbered
`Request k:` items, no chat template) and the Self-Instruct filters. Verdicts, in order: empty | too_short |
too_long | duplicate | keyword | rouge | ok | surplus (accepted past the target count); an accepted prompt joins
the pool at once, so two near-copies in one batch do not both pass (recipes/README.md, "Choices where the
paper is silent").
"""

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence


from selfreward.records import DataError, field, iter_jsonl, nonempty
from selfreward.recipes.segment import fold

DEFAULT_KEYWORDS = ("image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "diagram",
                    "flowchart", "video", "audio", "music", "draw", "plot", "file", "files", "map", "maps",
                    "go to")


@dataclass
class InstructConfig:
    n_seed_shots: int = 6
    n_generated_shots: int = 2
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 128
    batch: int = 16                 # few-shot prompts per generate call (one round)
    max_rounds: int = 1000          # give up after this many rounds even if short of the target
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    header: str = "Here are some requests that users sent to an AI assistant."
    seed: int = 0


def few_shot_text(examples: Sequence[str], header: str) -> str:
    items = "".join(f"Request {i}:\n{ex.strip()}\n\n" for i, ex in enumerate(examples, 1))
    return f"{header}\n\n{items}Request {len(examples) + 1}:\n"


_NEXT = re.compile(r"\n\s*Request \d+\s*:")


def cut_generated(text: str) -> str:
    """The model's new request: its text up to the next 'Request k:' marker, stripped."""
    return _NEXT.split(text, maxsplit=1)[0].strip()


def pick_shots(rng: random.Random, seeds: Sequence[str], generated: Sequence[str], cfg: InstructConfig) -> list[str]:
    """6 seed + 2 generated examples (fewer generated while the pool is small: seeds fill in), shuffled."""
    n_gen = min(cfg.n_generated_shots, len(generated))
    n_seed = min(cfg.n_seed_shots + cfg.n_generated_shots - n_gen, len(seeds))
    shots = rng.sample(list(seeds), n_seed) + rng.sample(list(generated), n_gen)
    rng.shuffle(shots)
    return shots


def fit_shots(tok, shots: list[str], cfg: InstructConfig, limit: int) -> list[int]:
    """BOS + the few-shot text, dropping the longest shot until it fits in `limit` tokens."""
    shots = list(shots)
    while True:
        ids = tok.encode(few_shot_text(shots, cfg.header), bos=True)
        if len(ids) <= limit:
            return ids
        if len(shots) <= 1:
            raise DataError(f"one few-shot example alone takes {len(ids)} tokens; the limit is {limit}")
        shots.remove(max(shots, key=len))


class PromptFilter:
    """The Self-Instruct filters over a growing pool. `check` gives a verdict; `add` puts a text in the pool."""

    def __init__(self, pool: Sequence[str], cfg: InstructConfig):
        from rouge_score import rouge_scorer, tokenizers   # here: nltk's import costs every torchrun rank seconds
        self.cfg = cfg
        self.tok = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.texts, self.bags, self.seen = [], [], set()     # the pool: texts, their word bags, folded texts
        self.kw = re.compile(r"\b(" + "|".join(re.escape(k) for k in cfg.keywords) + r")\b", re.IGNORECASE) \
            if cfg.keywords else None
        for p in pool:
            self.add(p)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.bags.append(Counter(self.tok.tokenize(text)))
        self.seen.add(fold(text))

    def max_rouge(self, text: str) -> float:
        """Max ROUGE-L F over the pool. The LCS is at most the bag-of-words overlap, so pool texts whose
        overlap bound is not above the best so far are skipped."""
        bag = Counter(self.tok.tokenize(text))
        n, best = sum(bag.values()), 0.0
        for t, b in zip(self.texts, self.bags):
            m = sum(b.values())
            if n and m and 2 * sum((bag & b).values()) / (n + m) > best:
                best = max(best, self.scorer.score(t, text)["rougeL"].fmeasure)
        return best

    def check(self, text: str) -> tuple[str, float | None]:
        words = len(text.split())
        for verdict, hit in (("empty", words == 0), ("too_short", words < self.cfg.min_words),
                             ("too_long", words > self.cfg.max_words), ("duplicate", fold(text) in self.seen),
                             ("keyword", self.kw is not None and self.kw.search(text))):
            if hit:
                return verdict, None
        r = self.max_rouge(text)
        return "rouge" if r >= self.cfg.rouge_threshold else "ok", r


def generate_prompts(engine, tok, seeds: Sequence[str], n: int, cfg: InstructConfig, writer,
                     earlier: Sequence[str] = (), progress: bool = False) -> list[dict]:
    """Make `n` accepted prompts. Records go to `writer` (a records.PartialWriter) one round at a
    time: {id, prompt, source: "generated", verdict, rouge, round}. Rounds already in the writer (a resumed
    run) rebuild the pool and are not redone; round r draws its shots from (seed, r), and its row j samples
    with its own seed, seed * 1_000_003 + r * batch + j."""
    from selfreward.infer.sequence import SamplingParams
    done = writer.records
    accepted = [r["prompt"] for r in done if r["verdict"] == "ok"]
    filt = PromptFilter(list(seeds) + list(earlier) + accepted, cfg)
    rnd = 1 + max((r["round"] for r in done), default=-1)
    limit = getattr(engine, "max_len", 1 << 30) - cfg.max_tokens - 1
    while len(accepted) < n and rnd < cfg.max_rounds:
        rng = random.Random(cfg.seed * 1_000_003 + rnd)
        pool = list(earlier) + accepted
        ids = [fit_shots(tok, pick_shots(rng, seeds, pool, cfg), cfg, limit) for _ in range(cfg.batch)]
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                 seed=cfg.seed * 1_000_003 + rnd * cfg.batch + j, stop=("\nRequest",))
                  for j in range(len(ids))]
        outs = engine.generate(ids, params, n=1)
        recs = []
        for j, group in enumerate(outs):
            text = cut_generated(group[0].text)
            verdict, rouge = filt.check(text)
            if verdict == "ok":
                if len(accepted) >= n:
                    verdict = "surplus"
                else:
                    filt.add(text)
                    accepted.append(text)
            recs.append({"id": f"gen-{rnd}-{j}", "prompt": text, "source": "generated", "verdict": verdict,
                         "rouge": None if rouge is None else round(rouge, 4), "round": rnd})
        writer.write(recs)
        if progress:
            print(f"[prompts] round {rnd}: {len(accepted)}/{n} accepted", flush=True)
        rnd += 1
    return writer.records


def given_prompts(src, t: int, n: int, seed: int) -> list[dict]:
    """Iteration t's prompt records from a JSONL file of {"id"?, "prompt"} (its t-th block of n records,
    wrapping around) or a function fn(t, n, seed) -> [str | {"id", "prompt"}]."""
    if callable(src):
        rows = [(f"prompt_source({t})", r) for r in src(t, n, seed)]
    else:
        lines = nonempty(list(iter_jsonl(src)), src, "prompts")
        pick = [lines[((t - 1) * n + j) % len(lines)] for j in range(min(n, len(lines)))] if n > 0 else lines
        rows = [(f"{src}:{line}", r) for line, r in pick]
    return [{"id": f"p{i}" if isinstance(r, str) else str(r.get("id", f"p{i}")),
             "prompt": r if isinstance(r, str) else field(r, "prompt", where), "source": "given", "verdict": "ok"}
            for i, (where, r) in enumerate(rows)]
