"""--eft-close: the EFT seed's close misses (data.close_miss), checked by hand (seconds)."""
import random
from collections import Counter

from selfreward.recipes.world import checker, data, judging
from selfreward.recipes.world.build import WorldModelConfig, write_seeds
from selfreward.recipes.world.tasks import Task, corrupt, draw_args, sample_tasks, solve
from selfreward.records import read_jsonl


def _min(args) -> Task:
    return Task("min", tuple(args), "Which is smallest: " + ", ".join(map(str, args)) + "?")


def test_close_miss_by_hand():
    rng = random.Random(0)
    cases = {(8, 40, 77): {"5", "6", "7", "9"},             # one digit, 1-3 away
             (0, 31, 52): {"1", "2", "3"},                  # not below 0
             (12, 40, 77): {"10", "11", "13", "14", "15"},  # two digits: not down to 9
             (98, 99): {"95", "96", "97", "99"}}            # not above 99
    for args, want in cases.items():
        assert {data.close_miss(_min(args), rng) for _ in range(300)} == want
    sort = Task("sort", (3, 1, 2), "Sort these digits: 3 1 2")
    for _ in range(50):
        assert checker.check(sort.prompt, data.close_miss(sort, rng)) == 0.0   # other kinds: one edit away


def _cands(rows) -> list[tuple[Task, str]]:
    out = []
    for r in rows:
        inner = r["prompt"].split("Task: ", 1)[1].split(" Answer: ", 1)
        out.append((checker.parse_prompt(inner[0]), inner[1].split(" Score 5 if", 1)[0]))
    return out


def _old_candidate(task: Task, rng: random.Random) -> str:
    """data.eft_candidate as it was before --eft-close (near misses on), written out by hand."""
    u = rng.random()
    if u < 0.4:
        return task.answer
    if u < 0.55:
        return corrupt(task.answer, rng)
    if u < 0.8:
        return data.near_miss(task, rng)
    while True:
        other = solve(task.kind, draw_args(task.kind, rng, None))
        if other != task.answer:
            return other


def test_eft_close_shares_and_judgments():
    rng = random.Random("eft:3")   # the default (close 0) draws what the seed drew before --eft-close
    old = [_old_candidate(t, rng) for t in sample_tasks(200, seed=30_003, kinds=("min",))]
    assert [c for _, c in _cands(data.eft_seed(200, 3, ("min",)))] == old
    rows = data.eft_seed(600, 3, ("min",), close=1.0)
    kinds = Counter()
    for (task, cand), r in zip(_cands(rows), rows):
        a = task.answer
        right = checker.check(task.prompt, cand) == 1.0
        assert right == r["correct"] == (int(r["response"].rsplit("Score: ", 1)[1]) == judging.GOOD)
        if not right:   # close 1.0: every wrong candidate is a close miss
            assert len(cand) == len(a) and 1 <= abs(int(cand) - int(a)) <= 3, (task, cand)
        kinds[right] += 1
    assert 0.33 < kinds[True] / len(rows) < 0.47   # the right share (40%) is kept
    wrong = [(t.answer, c) for t, c in _cands(data.eft_seed(600, 3, ("min",), close=0.5)) if c != t.answer]
    near = sum(len(c) == len(a) and 1 <= abs(int(c) - int(a)) <= 3 for a, c in wrong)
    assert 0.45 < near / len(wrong) < 0.75   # half, plus one-edit / near misses that land close by chance


def test_write_seeds_passes_eft_close(tmp_path):
    mc = WorldModelConfig()
    _, e0 = write_seeds(tmp_path / "a", 10, 300, 0, mc, ("min",))
    _, e1 = write_seeds(tmp_path / "b", 10, 300, 0, mc, ("min",), eft_close=1.0)
    assert read_jsonl(e0) == data.eft_seed(300, 0, ("min",), mc.judge_format)
    assert read_jsonl(e1) == data.eft_seed(300, 0, ("min",), mc.judge_format, close=1.0) != read_jsonl(e0)
