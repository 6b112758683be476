"""The reward model (train/rm.py, model/reward_model.py): loss and gradients against transformers'
LlamaForSequenceClassification with a plain-PyTorch loss, the export loading in
AutoModelForSequenceClassification with equal scores, resume, bad input, and 2 ranks equal 1 rank."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_fixtures import _sentence, make_model, make_spm, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-steps", "8", "--batch-size", "8", "--lr", "3e-3", "--final-lr", "3e-4", "--max-length", "64",
          "--dropout", "0", "--grad-clip", "1.0", "--warmup-steps", "1", "--save-every", "4"]


def label_records(n: int, seed: int = 0) -> list[dict]:
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = round(rng.random(), 3)
        out.append({"prompt": _sentence(rng, 4), "response_1": _sentence(rng, rng.randint(2, 7)),
                    "response_2": _sentence(rng, rng.randint(2, 7)), "label": [p, round(1 - p, 3)]})
    out.append({"prompt": _sentence(rng, 3), "chosen": _sentence(rng, 3), "rejected": _sentence(rng, 4)})
    return out


@pytest.fixture()
def tiny(tmp_path):
    spm = make_spm(tmp_path / "spm")
    return make_model(tmp_path / "m0", spm, kv_heads=2)


def _hf_scores(hf, seqs: list[list[int]], pad: int) -> torch.Tensor:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return hf(input_ids=ids, attention_mask=mask).logits[:, 0].float()       # [S]


def test_loss_and_gradients_equal_hf_twin(tiny, tmp_path):
    import transformers
    from selfreward.model.checkpoint import name_table
    from selfreward.model.reward_model import load_reward_model, save_reward_model
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train.rm import load_labeled, pair_rewards, soft_bt_loss
    tok = Tokenizer.load(tiny)
    ours = load_reward_model(tiny, seed=3)
    with torch.no_grad():   # a head large enough that the scores differ visibly
        ours.score.weight.mul_(50)
    save_reward_model(ours, ours.cfg, tmp_path / "rm", tok.pad_id, tokenizer_dir=tiny)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    pairs, _ = load_labeled([str(write_jsonl(tmp_path / "l.jsonl", label_records(5)))], tok, 40, 20)
    p1 = torch.tensor([lp.p1 for lp in pairs])
    assert p1[-1] == 1.0 and 0 < p1[0] < 1

    r1, r2 = pair_rewards(ours, pairs, tok.pad_id)
    loss = soft_bt_loss(r1, r2, p1).sum()
    loss.backward()

    # the twin: transformers' model on right-padded batches, each response set separately, and the loss
    # written as a binary cross-entropy with logits
    t1 = _hf_scores(hf, [lp.prompt + lp.chosen for lp in pairs], tok.pad_id)
    t2 = _hf_scores(hf, [lp.prompt + lp.rejected for lp in pairs], tok.pad_id)
    twin = torch.nn.functional.binary_cross_entropy_with_logits(t1 - t2, p1, reduction="sum")
    twin.backward()
    torch.testing.assert_close(r1.detach(), t1.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r2.detach(), t2.detach(), atol=1e-4, rtol=1e-4)
    assert abs(loss.item() - twin.item()) <= 1e-5 * max(1.0, twin.item())
    assert (t1 - t2).abs().max() > 1e-2             # the scores differ: the loss is not trivially log 2
    hp = dict(hf.named_parameters())
    table = {k: "model." + v[len("model."):] for k, v in name_table(ours.cfg).items() if k != "output.weight"}
    table["score.weight"] = "score.weight"
    for name, p in ours.named_parameters():
        g = hp[table[name]].grad
        # fp32 sums in a different order (packed vs padded): tolerance relative to the gradient's scale
        tol = 2e-5 * max(1.0, float(g.abs().max()))
        torch.testing.assert_close(p.grad, g, atol=tol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bad_label_is_an_error_naming_the_line(tiny, tmp_path):
    recs = label_records(3)
    recs[1]["label"] = [0.7, 0.7]
    data = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = subprocess.run([sys.executable, str(ROOT / "train" / "rm.py"), "--model", str(tiny), "--data", str(data),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr
    assert "error: " in r.stderr and "bad.jsonl:2: field 'label'" in r.stderr and "Traceback" not in r.stderr


def test_a_pair_without_label_is_an_error_unless_hard_labels(tiny, tmp_path):
    """Issue 33 cases 4 and 5: unlabelled pairs (rlaif label's input), or one labels record that lost its
    label, used to train as if response_1 always won. Now: `error: FILE:LINE: field 'label' ...`, exit 2,
    nothing exported; --hard-labels says response_1 wins (p1 = 1); chosen/rejected is a hard label as it is."""
    from cli_harness import run_cli
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train.rm import load_labeled
    unlabelled = [{k: v for k, v in r.items() if k != "label"} for r in label_records(3)[:3]]
    torn = label_records(4)
    del torn[2]["label"]
    args = ["--max-steps", "1", "--batch-size", "2", "--max-length", "40", "--dropout", "0"]
    for name, recs, line in (("unlabelled", unlabelled, 1), ("torn", torn, 3)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        code, err = run_cli("rm", ["--model", tiny, "--data", data, "--output", tmp_path / name, *args])
        assert code == 2 and err.startswith(f"error: {data}:{line}: field 'label' missing"), (code, err)
        assert "--hard-labels" in err and "Traceback" not in err and not (tmp_path / name / "model").exists()
    tok = Tokenizer.load(tiny)
    hard = write_jsonl(tmp_path / "hard.jsonl", unlabelled + [label_records(2)[-1]])   # + one chosen/rejected
    pairs, _ = load_labeled([str(hard)], tok, 40, 20, hard_labels=True)
    assert [lp.p1 for lp in pairs] == [1.0, 1.0, 1.0, 1.0]
    code, err = run_cli("rm", ["--model", tiny, "--data", hard, "--output", tmp_path / "h", "--hard-labels", *args])
    assert code == 0 and (tmp_path / "h" / "model" / "config.json").exists(), err


def test_a_huge_field_is_cut_in_the_error_line(tiny, tmp_path):
    """Issue 33: rm.py echoed a 6 MB label into its error line; the line now keeps its two ends and the size."""
    from cli_harness import run_cli
    recs = label_records(2)
    recs[0]["label"] = "x" * 6_000_000
    data = write_jsonl(tmp_path / "big.jsonl", recs)
    code, err = run_cli("rm", ["--model", tiny, "--data", data, "--output", tmp_path / "o", "--max-length", "40"])
    assert code == 2 and err.count("\n") == 1 and len(err) < 600 + len(str(data)), err[:1000]
    assert err.startswith(f"error: {data}:1: field 'label' should be [p1, p2]") and "(6.0 MB cut)" in err, err[:1000]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_rank_resume_and_hf_export(tiny, tmp_path):
    import transformers
    from selfreward.model.reward_model import load_reward_model, packed_rewards
    from selfreward.train import rm
    data = write_jsonl(tmp_path / "labels.jsonl", label_records(40))
    args = ["--model", str(tiny), "--data", str(data), "--eval-fraction", "0.2"] + COMMON
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train" / "rm.py")] + args + ["--output", str(tmp_path / "rm2"), "--micro-batch-size", "2"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp_path / "rm2.log", "w"), stderr=subprocess.STDOUT)
    try:
        rm.main(args + ["--output", str(tmp_path / "rm1")])
        assert p.wait(timeout=240) == 0, (tmp_path / "rm2.log").read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    one, two = metrics(tmp_path / "rm1"), metrics(tmp_path / "rm2")
    assert len(one) == len(two) and sum("loss" in r for r in one) == 8
    for a, b in zip(one, two):
        for k in ("loss", "accuracy", "margin", "eval_loss", "eval_accuracy"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    losses = [r["loss"] for r in one if "loss" in r]
    assert losses[-1] < losses[0]

    # resume: drop the last checkpoint as if killed after step 4; the rerun ends where the whole run did
    run = tmp_path / "rm1"
    shutil.copytree(run, tmp_path / "rm1r")
    ck = tmp_path / "rm1r" / "checkpoints"
    shutil.rmtree(ck / "step_00000008")
    (ck / "latest").write_text("step_00000004\n")
    shutil.rmtree(tmp_path / "rm1r" / "model")
    rm.main(args + ["--output", str(tmp_path / "rm1r"), "--resume"])
    again = metrics(tmp_path / "rm1r")
    # the same records carry a loss, and each loss is equal (pytest 9.2's approx no longer takes None entries)
    assert ["loss" in r for r in again] == ["loss" in r for r in one]
    assert [r["loss"] for r in again if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r],
                                                                       rel=1e-6)

    # the 2-rank export loads in transformers with the scores of our loader (fp32, <= 1e-4)
    out = tmp_path / "rm2" / "model"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_reward_model(out).eval()
    seqs = [[1, 5, 9, 17, 4, 2], [1, 7, 3], [1, 30, 31, 32, 33, 34, 35, 2]]
    with torch.no_grad():
        a = packed_rewards(ours, seqs, cfg["pad_token_id"])
        b = _hf_scores(hf, seqs, cfg["pad_token_id"])
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert a.std() > 0
        w1 = load_reward_model(tmp_path / "rm1" / "model").state_dict()
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(v, w1[k], atol=1e-4, rtol=1e-4)   # Adam at lr 3e-3: fp32 noise grows
