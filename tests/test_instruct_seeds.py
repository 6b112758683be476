"""Issue 13 item 2: each few-shot row of a self-instruct round samples with its own seed, and the seeds (and
so the records) are the same on a rerun."""
from selfreward.records import PartialWriter
from selfreward.recipes.instruct import InstructConfig, generate_prompts


class WordTok:
    def encode(self, text, bos=False):
        return [1] * bos + [2 + len(w) for w in text.split()]


class SeedEngine:
    """Records each row's seed; the reply is a function of the seed alone, as a sampler's would be."""
    max_len = 10_000

    def __init__(self):
        self.seeds: list[list[int]] = []

    def generate(self, ids, params, n=1):
        assert isinstance(params, list) and len(params) == len(ids)
        self.seeds.append([p.seed for p in params])
        return [[type("C", (), {"text": f" Describe the number {p.seed} in words please.\nRequest 9:"})()]
                for p in params]


def _run(tmp_path, name, seed=3):
    eng = SeedEngine()
    cfg = InstructConfig(batch=4, seed=seed, rouge_threshold=1.01)
    seeds = [f"seed request number {i} about something" for i in range(8)]
    with PartialWriter(tmp_path / f"{name}.jsonl") as w:
        recs = generate_prompts(eng, WordTok(), seeds, 8, cfg, w)
    return eng.seeds, recs


def test_rows_get_their_own_seeds(tmp_path):
    seeds, recs = _run(tmp_path, "a")
    assert len(seeds) == 2 and all(len(rnd) == 4 for rnd in seeds)   # 8 prompts, 4 rows a round
    flat = [s for rnd in seeds for s in rnd]
    assert len(set(flat)) == len(flat)                         # distinct within and across rounds
    assert sum(r["verdict"] == "ok" for r in recs) == 8        # distinct seeds, distinct texts: none duplicate
    again, recs2 = _run(tmp_path, "b")
    assert again == seeds and recs2 == recs                    # deterministic across reruns
    other, _ = _run(tmp_path, "c", seed=4)                     # another --seed samples other rows
    assert not set(flat) & {s for rnd in other for s in rnd}
