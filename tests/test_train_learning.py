"""On a small real set (OASST first turns): SFT lowers the held-out loss of a tiny model, and DPO on
(rank-0 reply, lowest-ranked reply) pairs then raises the chosen-minus-rejected margin and the accuracy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import need_shared
from hf_tiny import make_hf_checkpoint
from test_train_fixtures import write_jsonl


def first_turns(path: Path) -> tuple[list[dict], list[dict]]:
    """A tiny local extractor: each tree's prompt with its rank-0 reply (IFT), and with its best and worst
    ranked replies (pairs). The real builder is recipes/oasst.py; the test does not depend on it."""
    ift, pairs = [], []
    for line in path.read_text().splitlines():
        root = json.loads(line)["prompt"]
        ranked = sorted((r for r in root.get("replies", []) if r.get("rank") is not None and not r.get("deleted")),
                        key=lambda r: r["rank"])
        if not ranked:
            continue
        ift.append({"prompt": root["text"], "response": ranked[0]["text"]})
        if len(ranked) > 1:
            pairs.append({"prompt": root["text"], "chosen": ranked[0]["text"], "rejected": ranked[-1]["text"]})
    return ift, pairs


def test_sft_lowers_heldout_loss_then_dpo_raises_margin(tmp_path):
    from selfreward.train import dpo, sft
    data = need_shared("data/oasst_en_100_trees.jsonl")
    tok = need_shared("fixtures/stories260k") / "tokenizer.model"
    ift, pairs = first_turns(data)
    assert len(ift) >= 60 and len(pairs) >= 16
    m0 = make_hf_checkpoint(tmp_path / "m0", "llama_tied", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
                            intermediate=128)
    shutil.copy(tok, m0 / "tokenizer.model")
    write_jsonl(tmp_path / "train.jsonl", ift[:-16])
    write_jsonl(tmp_path / "heldout.jsonl", ift[-16:])
    common = ["--max-length", "128", "--threads", "1", "--warmup-steps", "2", "--dropout", "0.1"]
    sft.main(["--model", str(m0), "--data", str(tmp_path / "train.jsonl"), "--eval-data",
              str(tmp_path / "heldout.jsonl"), "--output", str(tmp_path / "sft"), "--max-steps", "24",
              "--batch-size", "8", "--lr", "3e-3", "--final-lr", "3e-4", *common])
    ev = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    ev = [r["eval_loss"] for r in ev if "eval_loss" in r]
    assert len(ev) == 2 and ev[1] < ev[0] - 1.0, ev          # held-out cross-entropy, start -> end

    # DPO from the SFT model; full-batch steps, so every step's metrics are over the same 16 pairs
    write_jsonl(tmp_path / "pairs.jsonl", pairs[:16])
    dpo.main(["--model", str(tmp_path / "sft" / "model"), "--data", str(tmp_path / "pairs.jsonl"),
              "--output", str(tmp_path / "dpo"), "--max-steps", "12", "--batch-size", "16", "--micro-batch-size", "8",
              "--lr", "2e-3", "--final-lr", "2e-4", "--beta", "0.1", *common])
    m = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(m[0]["margin"]) < 0.5 and m[-1]["margin"] > m[0]["margin"] + 1.0, [r["margin"] for r in m]
    assert m[-1]["accuracy"] > m[0]["accuracy"] and m[-1]["accuracy"] >= 0.75, [r["accuracy"] for r in m]
    assert m[-1]["loss"] < m[0]["loss"]
