"""The embedded world: tasks, checker, judge format, seed data, tokenizer (fast unit tests)."""
import random

import pytest

from selfreward.recipes.world import checker, data, judging, tasks
from selfreward.recipes.world.tasks import KINDS, Task


def test_solve_by_hand():
    assert tasks.solve("add", (23, 45)) == "68"
    assert tasks.solve("add", (70, 85)) == "155"
    assert tasks.solve("max", (7, 81, 30)) == "81"
    assert tasks.solve("sort", (5, 1, 4, 1, 0)) == "0 1 1 4 5"
    assert tasks.solve("reverse", ("c", "a", "b", "e", "d")) == "d e b a c"
    assert tasks.solve("count", ("b", ("b", "a", "b", "c", "d", "b"))) == "3"


def test_every_template_parses_back():
    rng = random.Random(0)
    for kind in KINDS:
        for i in range(len(tasks.TEMPLATES[kind])):
            for _ in range(20):
                args = tasks.draw_args(kind, rng)
                t = Task(kind, args, tasks.render(kind, args, i))
                assert checker.parse_prompt(t.prompt) == t, t.prompt
    assert checker.parse_prompt("Tell me a joke.") is None
    assert checker.check("Tell me a joke.", "no") is None


def test_heldout_never_in_training_data():
    held = {t.key for t in tasks.heldout_eval_set(200)}
    assert len(held) == 200 and all(tasks.is_held_out(k) for k in held)
    assert {t.kind for t in tasks.heldout_eval_set(200)} == set(tasks.DEFAULT_KINDS)
    assert {t.kind for t in tasks.heldout_eval_set(200, kinds=KINDS)} == set(KINDS)
    train_prompts = [r["prompt"] for r in data.ift_seed(300, 0)] + [r["prompt"] for r in data.loop_prompts(300, 0)]
    for p in train_prompts:
        assert not tasks.is_held_out(checker.parse_prompt(p).key)
    for r in data.eft_seed(200, 0):
        inner = r["prompt"].split("Task: ", 1)[1].split(" Answer: ", 1)[0]
        assert not tasks.is_held_out(checker.parse_prompt(inner).key)
    for r in data.web_docs(300, 0):
        inner = r["text"].split("User: ", 1)[1].split("\n\n", 1)[0]
        if inner.startswith("Judge."):
            inner = inner.split("Task: ", 1)[1].split(" Answer: ", 1)[0]
        assert not tasks.is_held_out(checker.parse_prompt(inner).key)
    # the split is a sizeable share of each kind, and eval prompts are balanced over kinds
    share = sum(tasks.is_held_out(t.key) for t in tasks.sample_tasks(2000, 1, unique=False))
    assert 0 == share  # the train generator never draws a held-out instance
    assert tasks.sample_tasks(5, 3) == tasks.sample_tasks(5, 3)


def test_checker_scores_responses():
    t = Task("add", (23, 45), "What is 23 plus 45?")
    assert checker.check(t.prompt, "68") == 1.0
    assert checker.check(t.prompt, " 68 ") == 1.0
    assert checker.check(t.prompt, "69") == 0.0
    assert checker.check(t.prompt, "68 apples") == 0.0
    assert checker.check(t.prompt, "") == 0.0
    r = Task("reverse", ("c", "a", "b", "e", "d"), "Reverse: c a b e d")
    assert checker.check(r.prompt, "d e b a c") == 1.0 and checker.check(r.prompt, "d e b a") == 0.0


def test_corrupt_is_always_wrong():
    rng = random.Random(0)
    for t in tasks.sample_tasks(300, 2):
        bad = tasks.corrupt(t.answer, rng)
        assert bad != t.answer and not checker.is_correct(t, bad)


def test_judgment_format_answer():
    t = Task("add", (23, 45), "What is 23 plus 45?")
    assert judging.judgment(t, "68", fmt="answer") == "6 6 + 8 8 + Score: 5"
    assert judging.judgment(t, "69", fmt="answer") == "6 6 + 9 8 - Score: 1"
    assert judging.judgment(t, "6", fmt="answer") == "6 6 + _ 8 - Score: 1"
    assert judging.judgment(t, "68", believed="67", fmt="answer") == "6 6 + 8 7 - Score: 1"


def test_judgment_format_check():
    """Local verification steps: no step needs the answer computed first."""
    j = judging.judgment
    add = Task("add", (23, 45), "What is 23 plus 45?")
    assert j(add, "68", fmt="check") == "3 5 0 8 + 2 4 0 6 + Score: 5"
    assert j(add, "69", fmt="check") == "3 5 0 9 - 2 4 0 6 + Score: 1"
    assert j(Task("add", (58, 67), "Add 58 and 67."), "125", fmt="check") == \
        "8 7 0 5 + 5 6 1 2 + 0 0 1 1 + Score: 5"
    srt = Task("sort", (3, 1, 2, 2, 0), "Sort these digits: 3 1 2 2 0")
    assert j(srt, "0 1 2 2 3", fmt="check") == "0 1 + 1 2 + 2 2 + 2 3 + 3 + 1 + 2 + 2 + 0 + 5 5 + Score: 5"
    assert j(srt, "0 1 2 3", fmt="check") == "0 1 + 1 2 + 2 3 + 3 + 1 + 2 - 2 - 0 + 4 5 - Score: 1"
    assert j(srt, "1 0 2 2 3", fmt="check").endswith("Score: 1")
    rev = Task("reverse", tuple("cabed"), "Reverse: c a b e d")
    assert j(rev, "d e b a c", fmt="check") == j(rev, "d e b a c", fmt="answer")
    mx = Task("max", (7, 81, 30), "Which is largest: 7, 81, 30?")
    assert j(mx, "81", fmt="check") == "81 7 + 81 81 = 81 30 + Score: 5"
    assert j(mx, "91", fmt="check") == "91 7 + 91 81 + 91 30 + Score: 1"   # no '=': not one of them
    assert j(mx, "30", fmt="check") == "30 7 + 30 81 - 30 30 = Score: 1"
    mn = Task("min", (7, 81, 30, 5, 62), "Which is smallest: 7, 81, 30, 5, 62?")
    assert mn.answer == "5"
    assert j(mn, "5", fmt="check") == "5 7 - 5 81 - 5 30 - 5 5 = 5 62 - Score: 5"
    assert j(mn, "7", fmt="check") == "7 7 = 7 81 - 7 30 - 7 5 + 7 62 - Score: 1"
    assert j(mn, "4", fmt="check").endswith("Score: 1")                  # smaller than all, but not one of them
    assert checker.parse_prompt("Give the least number of 7 81 30 5 62.") == \
        Task("min", (7, 81, 30, 5, 62), "Give the least number of 7 81 30 5 62.")
    cnt = Task("count", ("b", tuple("bab")), "How many b in: b a b?")
    assert j(cnt, "2", fmt="check") == "b 1 a 1 b 2 2 2 + Score: 5"
    assert j(cnt, "3", fmt="check") == "b 1 a 1 b 2 3 2 - Score: 1"


@pytest.mark.parametrize("fmt", judging.FORMATS)
def test_judgment_agrees_with_checker(fmt):
    rng = random.Random(3)
    for t in tasks.sample_tasks(1500, 4, kinds=KINDS):
        for cand in (t.answer, tasks.corrupt(t.answer, rng), data.eft_candidate(t, rng), "", "a", "0" + t.answer):
            score = int(judging.judgment(t, cand, fmt=fmt).rsplit("Score: ", 1)[1])
            assert (score == judging.GOOD) == checker.is_correct(t, cand), (t, cand, fmt)


@pytest.mark.parametrize("fmt", judging.FORMATS)
def test_eft_seed_agrees_with_checker(fmt):
    for r in data.eft_seed(300, 0, fmt=fmt):
        inner = r["prompt"].split("Task: ", 1)[1].split(" Answer: ", 1)
        task = checker.parse_prompt(inner[0])
        cand = inner[1].split(" Score 5 if", 1)[0]
        assert r["response"] == judging.judgment(task, cand, fmt=fmt)
        score = int(r["response"].rsplit("Score: ", 1)[1])
        assert (score == judging.GOOD) == (checker.check(task.prompt, cand) == 1.0) == r["correct"]
    assert 0.3 < sum(r["correct"] for r in data.eft_seed(300, 0, fmt=fmt)) / 300 < 0.5


@pytest.mark.parametrize("fmt", judging.FORMATS)
def test_web_grading_is_imperfect(fmt):
    agree = n = 0
    for d in data.web_docs(1000, 0, p_right=0.75, p_judge=1.0, fmt=fmt):
        q, a = d["text"].split("\n\nAssistant: ")
        inner = q.split("Task: ", 1)[1].split(" Answer: ", 1)
        score = int(a.rsplit("Score: ", 1)[1])
        agree += (score == judging.GOOD) == (checker.check(inner[0], inner[1].split(" Score 5 if", 1)[0]) == 1.0)
        n += 1
    assert 0.75 < agree / n < 0.95     # wrong graders sometimes still land on the right score


def test_web_text_is_imperfect():
    docs = data.web_docs(2000, 0, p_right=0.75, p_judge=0.0)
    right = 0
    for d in docs:
        q, a = d["text"].split("\n\nAssistant: ")
        right += checker.check(q[len("User: "):], a) == 1.0
    assert 0.70 < right / len(docs) < 0.80


def test_tokenizer_one_token_per_symbol(tmp_path):
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.world.vocab import train_tokenizer
    tok = Tokenizer.load(train_tokenizer(tmp_path / "tok", vocab_size=160))
    assert tok.vocab_size == 160 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in ["6 8 + 9 8 - Score: 1", "81 7 + 81 81 = Score: 5", "d e b a c", "155", "What is 23 plus 45?"]:
        ids = tok.encode(text)
        assert 0 not in ids   # no <unk>
        assert tok.decode(ids) == text
    pieces = [tok._sp.id_to_piece(i) for i in tok.encode("1 5 5 + d 8 =")]
    assert all(len(p.lstrip("▁")) <= 1 for p in pieces), pieces


@pytest.mark.parametrize("kind", KINDS)
def test_heldout_bucket_share(kind):
    rng = random.Random(5)
    keys = [f"{kind}:{tasks.draw_args(kind, rng)!r}" for _ in range(3000)]
    share = sum(map(tasks.is_held_out, keys)) / len(keys)
    assert 0.15 < share < 0.25


def test_ranking_on_mixed_by_hand():
    from selfreward.recipes.world.report import ranking_on_mixed
    prompts = {"p": "What is 2 plus 3?", "q": "What is 1 plus 1?", "r": "What is 4 plus 4?"}
    cands = [{"id": "p", "sample": 0, "text": "5"}, {"id": "p", "sample": 1, "text": "6"},
             {"id": "p", "sample": 2, "text": "5"}, {"id": "p", "sample": 3, "text": "7"},
             {"id": "q", "sample": 0, "text": "2"}, {"id": "q", "sample": 1, "text": "2"},   # all right: skipped
             {"id": "r", "sample": 0, "text": "9"}, {"id": "r", "sample": 1, "text": "8"}]
    scores = {("p", 0): [5, 1], ("p", 1): [1, 1], ("p", 2): [5, 5], ("p", 3): [5, 5], ("q", 0): [5], ("q", 1): [1],
              ("r", 0): [None], ("r", 1): [1]}
    judg = [{"id": i, "sample": s, "score": v} for (i, s), vs in scores.items() for v in vs]
    # p: "5" pooled mean 4.0, "6" 1.0, "7" 5.0 -> (5,6) right>wrong, (5,7) backwards; r: "9" unparsed -> neither
    lik = {"5": -1.0, "6": -2.0, "7": -0.5, "8": -3.0, "9": -4.0}
    r = ranking_on_mixed(prompts, cands, judg, lambda items: [lik[t] for _, t in items])
    assert r["mixed_prompts"] == 2 and r["right_wrong_pairs"] == 3
    assert r["judge_rw"] == 1 / 3 and r["judge_wr"] == 1 / 3
    assert r["likelihood_rw"] == 2 / 3 and r["likelihood_wr"] == 1 / 3


def test_parse_kinds():
    assert tasks.parse_kinds("max, sort") == ("max", "sort")
    assert {t.kind for t in tasks.sample_tasks(50, 0, kinds=tasks.parse_kinds("max, sort"))} == {"max", "sort"}
    with pytest.raises(ValueError, match="unknown task kinds"):
        tasks.parse_kinds("max,divide")
