"""Instruction backtranslation (recipes/humpback.py, segment.py, curate.py): the backward model's loss mask,
segmentation and dedup on hand-written text, bad input, curation thresholds, a killed augmentation resumed,
2 ranks against 1, the system tags, and the whole recipe on a tiny model."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from selfreward.cli import from_dict, to_dict
from selfreward.recipes.humpback import HumpbackConfig, backward_records, run_path, stage_augment
from selfreward.recipes.segment import build_segments, dedup, read_documents, segment, shingles
from selfreward.recipes.session import Session
from selfreward.records import DataError, partial_path, read_jsonl, write_json, write_jsonl
from conftest import ROOT
from recipes_tiny import tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("m") / "m")


def test_backward_data_trains_on_the_instruction_only(tiny, tmp_path):
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train.data import load_sft
    tok = Tokenizer.load(tiny)
    seed = [{"prompt": "Name a fruit that is red.", "response": "An apple is red, and so is a cherry."}]
    recs = backward_records(seed)
    assert recs == [{"prompt": seed[0]["response"], "response": seed[0]["prompt"]}]
    path = write_jsonl(tmp_path / "b.jsonl", recs)
    (ex,), _ = load_sft([str(path)], tok, 512)          # the trainer's own reading of the file
    targets = [i for i, m in zip(ex.ids, ex.mask) if m]
    # by hand: the targets are the instruction's tokens and the end of the turn, nothing of the output
    assert targets == tok.encode(seed[0]["prompt"]) + [tok.eos_id]
    first = ex.mask.index(True)
    assert all(ex.mask[first:]) and not any(ex.mask[:first])
    assert seed[0]["response"] in tok.decode(ex.ids[:first]) and seed[0]["prompt"] not in tok.decode(ex.ids[:first])


def test_segmentation_packs_paragraphs_in_the_window():
    a, b, c = "a" * 30, "b" * 25, "c" * 58
    # a + b fit in 60 (30 + 2 + 25 = 57); c does not join them, nor 'd' c (61 > 60); 'd' is too short (< 20)
    segs, short = segment(f"{a}\n\n{b}\n  \n{c}\n\nd", 20, 60)
    assert segs == [f"{a}\n\n{b}", c] and short == 1
    # a paragraph over the limit is cut at its last sentence end before the limit, else at a space
    long = "One two three. Four five six seven. Eight nine ten eleven twelve."
    segs, _ = segment(long, 5, 40)
    assert segs == ["One two three. Four five six seven.", "Eight nine ten eleven twelve."]
    segs, _ = segment("word " * 20, 5, 22)              # no sentence end: at spaces, 4 words (19 chars) a piece
    assert segs == ["word word word word"] * 5          # two pieces would be 40 > 22: each its own segment
    # lines inside a paragraph are one paragraph (whitespace collapsed)
    assert segment("x y\nz", 1, 100) == (["x y z"], 0)


def test_dedup_exact_and_near_by_shingled_jaccard():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    near = base.replace("today", "tonight")             # 11 of 12 trigrams shared: J = 11/13 >= 0.8
    far = base.replace("fox", "cat")                    # 3 of 12 trigrams changed: J = 9/15 < 0.8
    sa, sn, sf = shingles(base, 3), shingles(near, 3), shingles(far, 3)
    assert len(sa & sn) / len(sa | sn) == 11 / 13 and len(sa & sf) / len(sa | sf) == 9 / 15
    segs = [{"text": base}, {"text": "  THE quick brown fox jumps over the lazy dog near the river bank TODAY "},
            {"text": near}, {"text": far}, {"text": "short text"}]
    kept, counts = dedup(segs, 0.8, 3)
    assert [s["text"] for s in kept] == [base, far, "short text"]
    assert counts == {"exact_duplicates": 1, "near_duplicates": 1}
    kept, counts = dedup(segs, 0.0, 3)                  # near-dup off: only the exact copy goes
    assert len(kept) == 4 and counts == {"exact_duplicates": 1, "near_duplicates": 0}


def test_reading_and_bad_input(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "alpha " * 5}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    (tmp_path / "b.txt").write_text("gamma\n\ndelta")
    docs = read_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")])
    assert [w for w, _ in docs] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3", f"{tmp_path}/b.txt:1"]
    segs, counts = build_segments([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")],
                                  from_dict(HumpbackConfig, {"segment": {"min_chars": 5, "max_chars": 100}}).segment)
    assert [s["text"] for s in segs] == ["alpha alpha alpha alpha alpha", "gamma\n\ndelta"]
    assert counts["too_short"] == 1 and [s["id"] for s in segs] == ["s0", "s1"]
    bad = {"n.jsonl": (json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 3}) + "\n", "n.jsonl:2: field 'text'"),
           "m.jsonl": ('{"body": "x"}\n', "m.jsonl:1: missing field 'text'"),
           "e.txt": ("  \n", "e.txt:1: empty file"),
           "z.bin": (b"line one\nline two\x00\x01", "z.bin:2: binary file"),
           "l.txt": (b"fine\n\xff\xfe bad", "l.txt:2: binary file (not UTF-8)")}
    for name, (data, msg) in bad.items():
        p = tmp_path / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            read_documents([str(p)])
    r = subprocess.run([sys.executable, "-m", "selfreward.recipes.humpback", "--run-dir", str(tmp_path / "run"),
                        "--unlabelled", str(tmp_path / "z.bin"), "--stage", "segments"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"error: {tmp_path}/z.bin:2: binary file (a NUL byte), not text")


def test_curation_keeps_exactly_the_pairs_at_or_above_k(tmp_path):
    from selfreward.recipes.humpback import stage_select
    cfg = from_dict(HumpbackConfig, {"run_dir": str(tmp_path), "curate": {"k": 3}})
    scores = {"c0": [5, 5, 5], "c1": [5, 4, None], "c2": [4, 4, 3], "c3": [3, 5, 4], "c4": [None, None, None],
              "c5": [1, 2, 5], "c6": [5, None, None]}
    means = {"c0": 5, "c1": 4.5, "c2": 11 / 3, "c3": 4, "c4": None, "c5": 8 / 3, "c6": 5}   # by hand
    cands = [{"id": i, "instruction": f"ask {i}", "output": f"text {i}"} for i in scores]
    cands.append({"id": "c7", "instruction": "", "output": "no instruction was written"})
    write_jsonl(run_path(cfg, "candidates.jsonl"), cands)
    write_jsonl(run_path(cfg, "iter_1", "ratings.jsonl"),
                [{"id": i, "k": k, "score": None if v is None else float(v)} for i, vs in scores.items()
                 for k, v in enumerate(vs)])
    st = stage_select(cfg, 1)
    for k in (4, 5):
        got = read_jsonl(run_path(cfg, "iter_1", f"A{k}.jsonl"))
        want = [i for i, m in means.items() if m is not None and m >= k]
        assert [r["id"] for r in got] == want
        assert all(r["prompt"] == f"ask {r['id']}" and r["response"] == f"text {r['id']}" for r in got)
    assert st["A4"] == 4 and st["A5"] == 2 and st["parse_failures"] == 6 and st["pairs_unscored"] == 1
    assert st["rating_histogram"] == {"1": 1, "2": 1, "3": 2, "4": 4, "5": 7, "unparsed": 6}
    assert st["pairs_rated"] == 7                       # the candidate without an instruction is not rated


def _aug_cfg(run, tiny, n=24, engine=None):
    segs = [{"id": f"s{i}", "text": f"Here is text number {i} about cats and bread.", "source": f"x:{i}"}
            for i in range(n)]
    write_jsonl(run / "segments.jsonl", segs)
    shutil.copytree(tiny, run / "backward" / "model")
    cfg = from_dict(HumpbackConfig, {"run_dir": str(run), "base_model": str(tiny), "chunk": 1,
                                     "augment": {"max_tokens": 12}, "engine": engine or {}})
    write_json(run / "config.json", to_dict(cfg))
    return cfg


def test_killed_augmentation_resumes_nothing_lost_or_duplicated(tiny, tmp_path):
    clean = _aug_cfg(tmp_path / "clean", tiny)
    stage_augment(clean, Session())
    cfg = _aug_cfg(tmp_path / "run", tiny)
    out = run_path(cfg, "candidates.jsonl")
    part = partial_path(out)
    cmd = [sys.executable, "-m", "selfreward.recipes.humpback", "--config", str(run_path(cfg, "config.json")),
           "--stage", "augment"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 120:
        if part.exists() and part.read_text().count("\n") >= 4:
            break
        if proc.poll() is not None:
            pytest.fail(f"stage ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the stage finished before it could be killed"
    before = part.read_text()
    assert 4 <= before.count("\n") < 24
    part.write_text(before + '{"id": "s23", "instr')         # a torn write, as a kill can leave
    stage_augment(cfg, Session())
    recs, ref = read_jsonl(out), read_jsonl(run_path(clean, "candidates.jsonl"))
    assert [r["id"] for r in recs] == [f"s{i}" for i in range(24)]     # each segment once, in order
    assert recs == ref                                  # the same records as a run never killed


@pytest.mark.parametrize("tp", [1, 2])
def test_augmentation_two_ranks_equal_one(tiny, tmp_path, tp):
    """2 ranks as 2 data-parallel engines (tp 1) or as one tensor-parallel engine (tp 2) == one process."""
    one, two = _aug_cfg(tmp_path / "one", tiny, 7), _aug_cfg(tmp_path / "two", tiny, 7, {"tensor_parallel": tp})
    stage_augment(one, Session())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "selfreward.recipes.humpback", "--config", str(run_path(two, "config.json")), "--stage", "augment"]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_jsonl(run_path(one, "candidates.jsonl")), read_jsonl(run_path(two, "candidates.jsonl"))
    assert len(b) == 7 and a == b
    assert not list(run_path(two).glob("candidates.jsonl.rank*"))


def test_sources_tagged_with_system_prompts(tmp_path, monkeypatch):
    from selfreward import cli
    from selfreward.recipes.humpback import sft_model
    seen = []
    monkeypatch.setattr(cli, "launch", lambda fn, c, *a, **k: seen.append(c))
    cfg = from_dict(HumpbackConfig, {"run_dir": str(tmp_path), "base_model": "B", "seed_tag": "S",
                                     "augmented_tag": "W", "sft": {"batch_size": 4}})
    sft_model(cfg, tmp_path / "m", ["seed.jsonl", "eft.jsonl"], ["A5.jsonl"], 1)
    cfg.tags = False
    sft_model(cfg, tmp_path / "m", ["seed.jsonl"], ["A5.jsonl"], 1)
    assert seen[0].system_prompt == ["seed.jsonl=S", "eft.jsonl=S", "A5.jsonl=W"]
    assert seen[0].data == ["seed.jsonl", "eft.jsonl", "A5.jsonl"] and seen[0].model == "B"
    assert seen[1].system_prompt == []


@pytest.mark.parametrize("seed_rows, aug_rows, flags, batch", [
    (2999, 0, [], 8), (3000, 0, [], 32), (2000, 1000, [], 32),          # the paper's: 8 below 3,000 examples
    (1999, 1000, [], 8), (100, 0, ["--sft-batch-size", "16"], 16), (3000, 0, ["--sft-batch-size", "8"], 8)])
def test_sft_batch_is_the_papers_unless_given(tmp_path, monkeypatch, seed_rows, aug_rows, flags, batch):
    """The paper fine-tunes with batch 32, or 8 on fewer than 3,000 examples (seed + augmented pairs counted
    together); --sft-batch-size, where given, holds at any size."""
    from selfreward import cli
    from selfreward.recipes.humpback import sft_model
    seen = []
    monkeypatch.setattr(cli, "launch", lambda fn, c, *a, **k: seen.append(c))
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"prompt": f"q{i}", "response": "a"} for i in range(seed_rows)])
    aug = [str(write_jsonl(tmp_path / "A5.jsonl", [{"prompt": f"w{i}", "response": "b"} for i in range(aug_rows)]))]
    cfg = cli.parse_config(HumpbackConfig, ["--run-dir", str(tmp_path), "--base-model", "B", *flags])
    sft_model(cfg, tmp_path / "m", [str(seed)], aug if aug_rows else [], 1)
    assert [c.batch_size for c in seen] == [batch]


def test_whole_recipe_on_a_tiny_model(tiny, tmp_path):
    from selfreward.recipes.humpback import main
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"prompt": f"Tell me about item {i}.",
                                                  "response": f"Item {i} is nice."} for i in range(6)])
    (tmp_path / "web.txt").write_text("\n\n".join(f"Cats sleep a lot, fact {i}." for i in range(5)))
    args = ["--run-dir", str(tmp_path / "run"), "--base-model", str(tiny), "--seed-data", str(seed),
            "--unlabelled", str(tmp_path / "web.txt"), "--segment-min-chars", "10", "--segment-max-chars", "30",
            "--sft-max-steps", "2", "--sft-batch-size", "2", "--sft-max-length", "256", "--augment-max-tokens", "8",
            "--curate-k", "2", "--curate-max-tokens", "8", "--curate-template", "short", "--chunk", "2",
            "--curate-score-from", "expected", "--curate-keep", "0", "5", "--train-k", "0"]   # A0: every scored pair
    ms = main(args)
    assert len(ms) == 3 and ms[0]["segments"]["kept"] == 5 and ms[0]["candidates"]["pairs"] == 5
    for t in (1, 2):
        m = ms[t]
        assert m["ratings"] == 2 * m["pairs_rated"] and sum(m["rating_histogram"].values()) == m["ratings"]
        assert m["A0"] == m["pairs_rated"] == 5 and m["pairs_unscored"] == 0
        assert (tmp_path / "run" / f"iter_{t}" / "model" / "config.json").exists()
    assert ms[2]["curator"] == str(tmp_path / "run" / "iter_1" / "model")


def test_curation_rubric_default_and_file(tmp_path):
    from selfreward.recipes.curate import CURATE_TEMPLATE, CurateConfig
    from selfreward.recipes.judge import TemplateError, judge_prompt, parse_score
    jc = CurateConfig(k=2).judge(seed=3)
    assert jc.text == CURATE_TEMPLATE and (jc.k, jc.seed, jc.expected) == (2, 3, False)
    filled = judge_prompt(jc.text, "Name a red fruit.", "An apple.")
    assert "Name a red fruit." in filled and "An apple." in filled and '"Score: <n>"' in filled
    assert parse_score("The text answers it well.\nScore: 4") == 4.0          # what the rubric asks for
    f = tmp_path / "r.txt"
    f.write_text("Rate {instruction} / {response}. Score: <n>")
    assert CurateConfig(template=str(f), score_from="expected").judge().text == f.read_text()
    assert CurateConfig(score_from="expected").judge().expected
    f.write_text("Rate {instruction} only.")
    with pytest.raises(TemplateError, match="lacks placeholder"):
        CurateConfig(template=str(f)).judge()


def test_curation_rubric_levels_1_and_2_carry_the_papers_meaning():
    """Issue 34: level 2 is a reply that covers most of the request but not directly (a general approach, not
    the exact answer), not one that leaves most of it unanswered; level 1 names text taken from elsewhere."""
    from selfreward.recipes.curate import CURATE_TEMPLATE
    levels = {ln[0]: ln.lower() for ln in CURATE_TEMPLATE.replace("\\\n", "").splitlines() if ln[:2] in
              {"1:", "2:", "3:", "4:", "5:"}}
    assert sorted(levels) == ["1", "2", "3", "4", "5"]
    assert all(w in levels["1"] for w in ("incomplete", "vague", "off-topic", "forum", "blog", "promotional"))
    assert "most of what the request asks" in levels["2"] and "not directly" in levels["2"]
    assert "general approach" in levels["2"] and "unanswered" not in levels["2"]


def test_a5_at_4_5_from_the_flags(tmp_path):
    """The paper's A5 is a mean rating >= 4.5: --curate-keep and --train-k take it (files A4.5.jsonl)."""
    from selfreward.cli import ConfigError, parse_config
    from selfreward.recipes.humpback import stage_select
    cfg = parse_config(HumpbackConfig, ["--run-dir", str(tmp_path), "--curate-keep", "4", "4.5", "--train-k", "4.5"])
    assert cfg.curate.keep == [4.0, 4.5] and cfg.train_k == 4.5
    means = {"a": [5, 4], "b": [4, 5, 5], "c": [4, 4, 5], "d": [5, 5], "e": [3, 5]}   # 4.5, 4.67, 4.33, 5, 4
    write_jsonl(run_path(cfg, "candidates.jsonl"), [{"id": i, "instruction": i, "output": i} for i in means])
    write_jsonl(run_path(cfg, "iter_1", "ratings.jsonl"),
                [{"id": i, "k": k, "score": float(v)} for i, vs in means.items() for k, v in enumerate(vs)])
    st = stage_select(cfg, 1)
    assert [r["id"] for r in read_jsonl(run_path(cfg, "iter_1", "A4.5.jsonl"))] == ["a", "b", "d"]
    assert [r["id"] for r in read_jsonl(run_path(cfg, "iter_1", "A4.jsonl"))] == ["a", "b", "c", "d", "e"]
    assert (st["A4"], st["A4.5"]) == (5, 3)
    with pytest.raises(ConfigError, match="--train-k 5 must be one of --curate-keep"):
        parse_config(HumpbackConfig, ["--curate-keep", "4", "4.5"])


def test_sft_defaults_are_the_papers():
    """Humpback's SFT: lr 1e-5 -> 9e-6 linear, weight decay 0.1, dropout 0.1, batch unset (the paper's rule,
    next test), also when another --sft-* flag is given; the loop's SFT (SRLM's 5.5e-6 -> 1.1e-6 cosine,
    batch 16) is unchanged."""
    from selfreward.cli import parse_config
    from selfreward.train.sft import SFTConfig
    for argv in ([], ["--sft-dropout", "0.05"]):
        s = parse_config(HumpbackConfig, argv).sft
        assert (s.lr, s.final_lr, s.schedule, s.weight_decay, s.batch_size) == (1e-5, 9e-6, "linear", 0.1, None)
        assert s.dropout == (0.05 if argv else 0.1)
    s = SFTConfig()
    assert (s.lr, s.final_lr, s.schedule, s.weight_decay, s.batch_size) == (5.5e-6, 1.1e-6, "cosine", 0.0, 16)
