"""2 ranks (torchrun, gloo, CPU, FSDP2) equal 1 process over 10 steps of the same global batch, for both
trainers; the export loads in transformers and in model.checkpoint.load_model with equal logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_train_fixtures import dpo_records, make_model, make_spm, sft_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-steps", "10", "--batch-size", "8", "--lr", "2e-3", "--final-lr", "2e-4", "--max-length", "40",
          "--dropout", "0", "--grad-clip", "0.5", "--warmup-steps", "2", "--save-every", "4"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(script: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train" / script)] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_two_ranks_equal_one_rank_and_export_loads(tmp_path):
    from selfreward.train import dpo, sft
    spm = make_spm(tmp_path / "spm")
    model = make_model(tmp_path / "m0", spm)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    dpo_data = write_jsonl(tmp_path / "dpo.jsonl", dpo_records(24))
    sft_args = ["--model", str(model), "--data", str(sft_data), "--eval-fraction", "0.2"] + COMMON
    dpo_args = ["--model", str(model), "--data", str(dpo_data)] + COMMON
    # 2 ranks: micro-batch 2 -> 2 accumulation steps per rank; SFT with activation checkpointing under
    # FSDP; DPO computes its reference cache sharded over the ranks
    p_sft = torchrun("sft.py", sft_args + ["--output", str(tmp_path / "sft2"), "--micro-batch-size", "2",
                                           "--activation-checkpointing", "--report-to", "tensorboard"],
                     tmp_path / "sft2.log")
    p_dpo = torchrun("dpo.py", dpo_args + ["--output", str(tmp_path / "dpo2"), "--micro-batch-size", "2"],
                     tmp_path / "dpo2.log")
    try:
        # 1 process, in-process, whole batch per forward (no accumulation); DPO with the online reference
        sft.main(sft_args + ["--output", str(tmp_path / "sft1")])
        dpo.main(dpo_args + ["--output", str(tmp_path / "dpo1"), "--ref-mode", "online"])
        for p, log in ((p_sft, "sft2.log"), (p_dpo, "dpo2.log")):
            assert p.wait(timeout=240) == 0, (tmp_path / log).read_text()[-3000:]
    finally:
        for p in (p_sft, p_dpo):
            if p.poll() is None:
                p.kill()   # torchrun's workers die with it (they watch their parent)

    for name, keys in (("sft", ("loss", "eval_loss")), ("dpo", ("loss", "margin", "logp_chosen"))):
        one, two = metrics(tmp_path / f"{name}1"), metrics(tmp_path / f"{name}2")
        assert len(one) == len(two) and sum("loss" in r for r in one) == 10
        for a, b in zip(one, two):
            assert a["step"] == b["step"]
            for k in keys:
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (name, a["step"], k, a[k], b[k])
        losses = [r["loss"] for r in one if "loss" in r]
        assert losses[-1] < losses[0]                                     # it trained
    assert "margin" in metrics(tmp_path / "dpo2")[-1]
    assert len(list((tmp_path / "sft2" / "tensorboard").iterdir())) == 1     # --report-to: rank 0 only

    # the 2-rank export: our loader and transformers give the same logits; it equals the 1-rank export
    import transformers
    from selfreward.model.checkpoint import load_model
    out = tmp_path / "sft2" / "model"
    assert (out / "tokenizer.model").exists()
    ours = load_model(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_batch(ids), hf(ids).logits.float(), atol=1e-4, rtol=1e-4)
        one = load_model(tmp_path / "sft1" / "model").state_dict()
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(v, one[k], atol=1e-5, rtol=1e-5)
    ckpts = sorted(p.name for p in (tmp_path / "sft2" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000008", "step_00000010"]   # keep 2, no temp leftovers
