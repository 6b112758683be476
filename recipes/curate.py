"""Self-curation for instruction backtranslation (recipes/README.md, step 5): the forward model rates each
(instruction, output) candidate on a 5-point scale (our wording); the pairs whose score is >= k are A_k.
"""

from collections import Counter
from dataclasses import dataclass, field

from selfreward import cli
from selfreward.recipes.judge import JudgeConfig, load_rubric, mean_scores

CURATE_TEMPLATE = """\
Below is a request and a text offered as the answer to it. Decide how good a training example the two make \
for an AI assistant, on this 5-point scale:
1: the text is incomplete, vague, off-topic or not what was asked; or it reads as taken from elsewhere: a forum \
post, someone's own experience from a blog, promotional or navigation text, other material that does not belong.
2: the text covers most of what the request asks, yet not directly: for instance it sketches a general approach \
where the request wants the exact answer.
3: the text answers the request usefully, yet reads like something written for another purpose, not a reply.
4: the text is a clear, complete, helpful reply to the request, with little that does not belong.
5: the text is an expert reply written for exactly this request: focused, accurate and well organised.

Request:
{instruction}

Text:
{response}

Give your reasons in a few sentences, then end with a line "Score: <n>", where <n> is 1, 2, 3, 4 or 5."""


@dataclass
class CurateConfig:
    k: int = 3                        # ratings sampled per pair, averaged
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    template: str = ""                # rubric file with {instruction} and {response}; "" = the built-in one
    score_from: str = cli.choice("sampled", "expected")  # sampled (mean of K) | expected (P of digits after "Score:")
    keep: list[float] = field(default_factory=lambda: [4, 5])   # A_k: score >= k; the paper's A5 is 4.5 (a mean)

    def judge(self, seed: int = 0) -> JudgeConfig:
        """The JudgeConfig recipes.judge.judge_items runs (the rubric text set on it)."""
        jc = JudgeConfig(k=self.k, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                         seed=seed, expected=self.score_from == "expected")
        jc.text = load_rubric(self.template) if self.template else CURATE_TEMPLATE
        return jc


def pair_scores(scores: list[dict], score_from: str) -> dict[str, float | None]:
    """Candidate id -> its score (mean of its parsed samples, or the expected score); None: none parsed."""
    return mean_scores(scores, "expected" if score_from == "expected" else "score", lambda r: r["id"])


def select(cands: list[dict], score: dict[str, float | None], k: float) -> list[dict]:
    """A_k: the candidates whose score is >= k, as SFT records {"prompt", "response"} (+ id, score)."""
    return [{"id": c["id"], "prompt": c["instruction"], "response": c["output"], "score": score[c["id"]]}
            for c in cands if score.get(c["id"]) is not None and score[c["id"]] >= k]


def curation_stats(scores: list[dict], per_pair: dict[str, float | None], keep: list[float],
                   kept: dict[float, int]) -> dict:
    """The manifest's figures: histogram of sampled scores, parse failures, pair scores, |A_k|."""
    hist = Counter("unparsed" if r["score"] is None else str(r["score"]).removesuffix(".0") for r in scores)
    rounded = Counter("unscored" if v is None else str(round(v)) for v in per_pair.values())
    return {"ratings": len(scores), "parse_failures": hist.get("unparsed", 0),
            "rating_histogram": dict(sorted(hist.items())), "pair_score_histogram": dict(sorted(rounded.items())),
            "pairs_rated": len(per_pair), "pairs_unscored": rounded.get("unscored", 0),
            **{f"A{k:g}": kept[k] for k in keep}}
