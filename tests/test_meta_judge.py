"""Meta-judging (issue 35): verdict parsing, the comparisons a judged response gets, judge pairs from the
battle of its judgments (hand-computed), length control of the actor's pairs, and the world's meta format."""
import random

import pytest

from selfreward.recipes.meta_judge import DEFAULT_TEMPLATE, SLOTS, judge_pairs, load_meta_template, meta_units, \
    parse_verdict
from selfreward.recipes.pairs import build_pairs
from selfreward.recipes.prompts import TemplateError


@pytest.mark.parametrize("text,want", [
    ("A is vague.\nBetter: A", "A"), ("better: b", "B"), ("Better: **B**", "B"), ("Better: Evaluation A", "A"),
    ("Better: (B)", "B"), ("Better: A ... on reflection Better: B", "B"), ("B is better", None),
    ("Better: AB", None), ("Better: C", None), ("", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_parse_verdict_other_names():
    assert parse_verdict("5 7 - Pick: 2", "Pick", ("1", "2")) == "B"
    assert parse_verdict("Pick: 1 Score: 5", "Pick", ("1", "2")) == "A"
    assert parse_verdict("Pick: 12", "Pick", ("1", "2")) is None and parse_verdict("Better: B", "Pick", ("1", "2")) is None


def test_world_meta_prompt_is_in_the_world_vocabulary():
    """Every character of the world's meta prompt and verdict is a piece of the shipped M0's tokenizer (a `B`
    would be an unknown piece: the loop's default names cannot be used there)."""
    from pathlib import Path
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.world.meta import meta_prompt
    tok = Tokenizer.load(Path(__file__).resolve().parents[1] / "recipes" / "world" / "m0")
    text = meta_prompt("Which is smallest: 7, 81, 5?", "5", "5 7 - Score: 5", "5 7 + Score: 1") + " 5 7 - Pick: 1 Pick: 2"
    assert 0 not in tok.encode(text) and tok.decode(tok.encode(text)).strip() == text
    assert 0 in tok.encode("Better: B")                       # the default names, for contrast


def test_template_slots(tmp_path):
    assert all(f"{{{s}}}" in DEFAULT_TEMPLATE for s in SLOTS)
    bad = tmp_path / "t.txt"
    bad.write_text("Which is better? {judgment_a} {judgment_b}")
    with pytest.raises(TemplateError, match="instruction"):
        load_meta_template(str(bad))


def _j(pid, sample, k, text, score=5.0, cut=False):
    return {"id": pid, "sample": sample, "k": k, "judgment": text, "score": score, "prompt_cut": cut}


def test_meta_units_distinct_judgments_both_orders():
    js = [_j("p", 0, 0, "x"), _j("p", 0, 1, "y"), _j("p", 0, 2, "x"),            # two distinct texts
          _j("p", 1, 0, "u"), _j("p", 1, 1, "u"),                                # one text: nothing to compare
          _j("q", 0, 0, "a"), _j("q", 0, 1, "b", score=None), _j("q", 0, 2, "c", cut=True),   # left out
          _j("r", 0, 0, "a"), _j("r", 0, 1, "b"), _j("r", 0, 2, "c")]
    units = meta_units(js)
    got = {(u["id"], u["sample"], u["a"], u["b"]) for u in units}
    assert got == {("p", 0, 0, 1), ("p", 0, 1, 0),
                   ("r", 0, 0, 1), ("r", 0, 1, 0), ("r", 0, 0, 2), ("r", 0, 2, 0), ("r", 0, 1, 2), ("r", 0, 2, 1)}
    assert len(units) == len(got)


def test_judge_pairs_by_win_rate():
    js = [_j("r", 0, 0, "j0", 5.0), _j("r", 0, 1, "j1", 1.0), _j("r", 0, 2, "j2", 1.0),
          _j("p", 0, 0, "x"), _j("p", 0, 1, "y"),
          _j("s", 0, 0, "m"), _j("s", 0, 1, "n")]

    def m(pid, a, b, v):
        return {"id": pid, "sample": 0, "a": a, "b": b, "verdict": v}
    metas = [  # r: j1 beats j0 both orders, j1 beats j2 once and loses once, j2 beats j0 once, one unparsable
        m("r", 0, 1, "B"), m("r", 1, 0, "A"), m("r", 1, 2, "A"), m("r", 2, 1, "A"), m("r", 0, 2, "B"), m("r", 2, 0, None),
        m("p", 0, 1, "A"), m("p", 1, 0, "A"),            # position only: a tie, no pair
        m("s", 0, 1, "B"), m("s", 1, 0, "A")]             # n wins both orders
    pairs, c = judge_pairs({"r": "R?", "p": "P?", "s": "S?"}, {("r", 0): "ra", ("p", 0): "pa", ("s", 0): "sa"}, js, metas,
                           "Q: {instruction} A: {response}")
    # r: wins j0 0/4, j1 3/4, j2 2/4 -> j1 over j0
    by = {p["id"]: p for p in pairs}
    assert set(by) == {"r", "s"}
    assert (by["r"]["chosen"], by["r"]["rejected"], by["r"]["chosen_rate"], by["r"]["rejected_rate"]) == ("j1", "j0", 0.75, 0.0)
    assert by["r"]["prompt"] == "Q: R? A: ra"
    assert (by["s"]["chosen"], by["s"]["rejected"]) == ("n", "m")
    assert c["responses_compared"] == 3 and c["judge_pairs"] == 2 and c["meta_ties"] == 1
    assert c["meta_verdicts"] == 10 and c["meta_parse_failures"] == 1
    assert c["meta_first_position"] == 6 and c["meta_position_bias"] == round(6 / 9, 4)
    assert c["meta_position_only"] == 2              # r's (1, 2) and p's (0, 1)


def test_length_control_picks_the_shortest_near_the_top():
    prompts = [{"id": "p", "prompt": "P"}]
    cands = [{"id": "p", "sample": i, "text": t} for i, t in enumerate(["long long answer", "short", "mid one", "bad"])]
    js = [{"id": "p", "sample": i, "k": 0, "score": s} for i, s in enumerate([5.0, 4.0, 4.5, 1.0])]
    pairs, c = build_pairs(prompts, cands, js)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("long long answer", "bad")
    # rho 0.3: within 0.3 x (5 - 1) = 1.2 of the best: 5, 4.5 and 4 -> "short" (5 chars)
    pairs, c = build_pairs(prompts, cands, js, length_control=0.3)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("short", "bad") and c["length_controlled"] == 1
    # rho 0.15: within 0.6: 5 and 4.5 -> "mid one"; best-rest pairs it with the texts scored below it
    pairs, c = build_pairs(prompts, cands, js, length_control=0.15, pairing="best-rest")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("mid one", "short"), ("mid one", "bad")]


def test_world_meta_judgment_checks_the_checks():
    from selfreward.recipes.world.meta import first_difference, meta_judgment, slipped_judgment, steps_of
    from selfreward.recipes.world.tasks import Task
    t = Task("min", (7, 81, 5), "Which is smallest: 7, 81, 5?")
    right = "5 7 - 5 81 - 5 5 = Score: 5"
    assert steps_of(right) == ["5 7 -", "5 81 -", "5 5 =", "Score: 5"]
    slip = "5 7 - 5 8 - 5 5 = Score: 5"                     # 81 copied as 8
    # max / min: per input number, does each judgment hold its right step; then the score; fewer '-' wins
    assert meta_judgment(t, "5", right, slip) == "7 + + 81 + - 5 + + Score: 5 + + Pick: 1"
    assert meta_judgment(t, "5", slip, right) == "7 + + 81 - + 5 + + Score: 5 + + Pick: 2"
    flipped = "5 7 - 5 81 - 5 5 - Score: 1"                  # the equal step marked smaller, the score following
    assert meta_judgment(t, "5", flipped, right) == "7 + + 81 + + 5 - + Score: 5 - + Pick: 2"
    assert meta_judgment(t, "5", slip, "5 7 - 5 80 - 5 5 = Score: 5") is None   # one wrong step each
    # other kinds: the shared steps, the right step where the two first differ
    s = Task("sort", (3, 1, 2), "Sort these digits: 3 1 2")
    good = "1 2 + 2 3 + 3 + 1 + 2 + 3 3 + Score: 5"
    assert steps_of(good) == steps_of(__import__("selfreward.recipes.world.judging", fromlist=["x"]).judgment(s, "1 2 3"))
    bad = "1 2 + 2 3 - 3 + 1 + 2 + 3 3 + Score: 1"
    assert first_difference(good, bad) == 1
    assert meta_judgment(s, "1 2 3", bad, good) == "1 2 + 2 3 + Pick: 2"
    assert meta_judgment(s, "1 2 3", good, good) is None
    rng = random.Random(0)
    ref = "7 7 = 7 81 - 7 5 + Score: 1"                     # the candidate 7: the reference judgment
    seen = set()
    for _ in range(60):                                      # a slipped judgment always loses to the reference
        w = slipped_judgment(t, "7", rng)
        if w is None:
            continue
        seen.add(w)
        assert meta_judgment(t, "7", w, ref).endswith("Pick: 2") and meta_judgment(t, "7", ref, w).endswith("Pick: 1")
    assert len(seen) >= 6


def test_loop_meta_stage_to_dpo_data(tmp_path, monkeypatch):
    """The loop's meta_judge stage on a tiny random model: every comparison meta_units names is made once, in
    both orders, through the sharded-stage machinery (resumable units); a meta-judge that prefers the
    alphabetically first judgment gives one judge pair per response with two distinct judgments, and the
    iteration's DPO data holds them beside the actor's pairs."""
    from selfreward.recipes import self_reward as sr
    from selfreward.recipes.pipeline import folder
    from selfreward.recipes.session import Session
    from selfreward.records import read_jsonl
    from recipes_tiny import SEEDS, loop_config, tiny_chat_model, write_prompts
    m1 = tiny_chat_model(tmp_path / "m1")
    cfg = loop_config(run_dir=str(tmp_path / "run"), init_model=str(m1), n_prompts=4, n_candidates=3, judge_k=3,
                      max_tokens=6, judge_max_tokens=6, judge_template="short", chunk=3, meta_judge=True,
                      judge_distinct=False,
                      prompt_source=str(write_prompts(tmp_path / "p.jsonl", SEEDS)))
    s = Session()
    for st in (sr.stage_prompts, sr.stage_candidates, sr.stage_judge):
        st(cfg, 1, s)
    it = folder(cfg, 1)
    judg = read_jsonl(it / "judgments.jsonl")
    for j in judg:              # random judgments parse rarely: give every one a score so all take part
        j["score"] = 3.0
    (it / "judgments.jsonl").write_text("".join(__import__("json").dumps(j) + "\n" for j in judg))
    seen = []

    def fake(engine, tok, items, mcfg, seeds):
        seen.extend(items)
        return [(f"first is {min(a, b)!r}", "A" if a <= b else "B", False) for _, _, a, b in items]
    monkeypatch.setattr(sr, "meta_judge_items", fake)
    sr.stage_meta_judge(cfg, 1, s)
    metas = read_jsonl(it / "meta_judgments.jsonl")
    units = meta_units(judg)
    assert sorted((m["id"], m["sample"], m["a"], m["b"]) for m in metas) == \
        sorted((u["id"], u["sample"], u["a"], u["b"]) for u in units) and len(seen) == len(units) > 0
    stats = sr.stage_pairs(cfg, 1)
    jp = read_jsonl(it / "judge_pairs.jsonl")
    texts: dict = {}
    for j in judg:
        texts.setdefault((j["id"], j["sample"]), set()).add(j["judgment"])
    multi = {k: v for k, v in texts.items() if len(v) > 1}
    assert {(p["id"], p["sample"]): (p["chosen"], p["rejected"]) for p in jp} == \
        {k: (min(v), max(v)) for k, v in multi.items()}
    assert stats["meta"]["judge_pairs"] == len(multi) and stats["meta"]["meta_parse_failures"] == 0
    assert sr.dpo_inputs(cfg, 1) == [str(it / "pairs.jsonl"), str(it / "judge_pairs.jsonl")]
    sr.stage_meta_judge(cfg, 1, s)                     # done: not made again
    assert len(seen) == len(units)


def test_meta_oracle_verdicts_name_the_right_judgment():
    """The world's meta-oracle control: every comparison meta_units names gets the reference verdict, which
    names the judgment holding the right steps in both orders; where it names neither, the verdict is null."""
    from selfreward.recipes.world.controls import checker_meta_judgments
    prompt = "Which is smallest: 7, 81, 5?"
    cands = [{"id": "p", "sample": 0, "text": "5"}, {"id": "p", "sample": 1, "text": "7"}]
    js = [_j("p", 0, 0, "5 7 - 5 81 - 5 5 = Score: 5"), _j("p", 0, 1, "5 7 - 5 8 - 5 5 = Score: 5"),
          _j("p", 1, 0, "7 7 = 7 8 - 7 5 + Score: 1", 1.0), _j("p", 1, 1, "7 7 = 7 80 - 7 5 + Score: 1", 1.0)]
    got = {(m["sample"], m["a"], m["b"]): m["verdict"] for m in checker_meta_judgments({"p": prompt}, cands, js)}
    assert got == {(0, 0, 1): "A", (0, 1, 0): "B", (1, 0, 1): None, (1, 1, 0): None}


def test_world_demo_meta_rows(tmp_path):
    """The world demo with --meta-judge and the meta-oracle control at smoke sizes: M1 is trained on the meta
    seed too, every iteration of the loop meta-judges its judgments (both orders of each comparison), the rows
    carry the meta-judge's agreement with the checker, and the meta-oracle's verdicts are the reference's."""
    from selfreward.recipes.world import demo
    from selfreward.records import read_jsonl
    run = tmp_path / "run"
    s = demo.main(["--smoke", "--meta-judge", "--n-meta", "16", "--controls", "meta-oracle", "--run-dir", str(run),
                   "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert len(read_jsonl(run / "seed" / "meta.jsonl")) == 16
    assert len(read_jsonl(run / "seed" / "eft_meta.jsonl")) == 16 + len(read_jsonl(run / "seed" / "eft.jsonl"))
    rows = {r["model"]: r for r in s["rows"]}
    assert {"M1", "M2", "M3", "M2-meta-oracle", "M3-meta-oracle"} <= set(rows)
    for t in (1, 2):
        metas = read_jsonl(run / "loop" / f"iter_{t}" / "meta_judgments.jsonl")
        pairs = {(m["id"], m["sample"], m["a"], m["b"]) for m in metas}
        assert all((i, smp, b, a) in pairs for i, smp, a, b in pairs)       # both orders
        assert rows[f"M{t}"]["meta_comparisons"] == len(metas)
    oracle = rows["M2-meta-oracle"]
    assert oracle["meta_step_cases"] == 0 or oracle["meta_agree_step"] == 1.0


def test_meta_stage_under_torchrun_two_ranks_equal_one(tmp_path):
    """The meta_judge stage shards like the judge stage: 2 ranks under torchrun write the file one process
    writes (the meta-judgments are greedy; units split by comparison)."""
    import json
    import shutil
    from selfreward.recipes import self_reward as sr
    from selfreward.recipes.pipeline import folder
    from selfreward.recipes.session import Session
    from selfreward.records import read_jsonl
    from recipes_tiny import SEEDS, loop_config, tiny_chat_model, torchrun_stage, write_prompts
    m1 = tiny_chat_model(tmp_path / "m1")
    cfgs = [loop_config(run_dir=str(tmp_path / name), init_model=str(m1), n_prompts=3, n_candidates=2, judge_k=3,
                        max_tokens=4, judge_max_tokens=6, judge_template="short", chunk=2, meta_judge=True,
                        judge_distinct=False, meta={"max_tokens": 5},
                        prompt_source=str(write_prompts(tmp_path / "p.jsonl", SEEDS))) for name in ("one", "two")]
    s = Session()
    for st in (sr.stage_prompts, sr.stage_candidates, sr.stage_judge):
        st(cfgs[0], 1, s)
    it1, it2 = folder(cfgs[0], 1), folder(cfgs[1], 1)
    judg = read_jsonl(it1 / "judgments.jsonl")
    for j in judg:
        j["score"] = 3.0
    (it1 / "judgments.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judg))
    it2.mkdir(parents=True)
    for f in ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl"):
        shutil.copy2(it1 / f, it2 / f)
    sr.stage_meta_judge(cfgs[0], 1, s)
    torchrun_stage(cfgs[1], tmp_path / "two", "meta_judge")
    one, two = read_jsonl(it1 / "meta_judgments.jsonl"), read_jsonl(it2 / "meta_judgments.jsonl")
    assert len(one) == len(meta_units(judg)) > 0 and two == one


def test_meta_stage_refused_when_off(tmp_path):
    from selfreward import cli
    from selfreward.cli import to_dict
    from selfreward.recipes import self_reward as sr
    from selfreward.records import write_json
    cfg = sr.LoopConfig(run_dir=str(tmp_path), init_model=str(tmp_path / "m1"))
    write_json(tmp_path / "config.json", to_dict(cfg))
    with pytest.raises(cli.ConfigError, match="--stage meta_judge is off"):
        sr.main(["--config", str(tmp_path / "config.json"), "--stage", "meta_judge", "--iter", "1"])
    with pytest.raises(cli.ConfigError, match="--length-control 1.0"):
        sr.LoopConfig(run_dir=str(tmp_path), init_model="m", length_control=1.0)


def test_meta_template_that_cannot_fit_is_refused_before_work(tmp_path):
    from selfreward.recipes.meta_judge import MetaJudgeConfig, check_meta_fits

    class Tok:
        def user_ids(self, text):
            return text.split()

    class Engine:
        max_len = 64
    long = tmp_path / "long.txt"
    long.write_text("word " * 40 + "{instruction} {response} {judgment_a} {judgment_b}")
    check_meta_fits(Engine(), Tok(), MetaJudgeConfig(template=str(long), max_tokens=4))     # 40 + 16 <= 59
    with pytest.raises(TemplateError, match="the template alone takes 40 tokens"):
        check_meta_fits(Engine(), Tok(), MetaJudgeConfig(template=str(long), max_tokens=16))
