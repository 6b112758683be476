"""Tensor parallelism on CPU with gloo, in one 4-rank torchrun (tests/tp_worker.py): TP 2 and TP 4 engines
against transformers and the 1-rank engine on tiny checkpoints of each family (GQA with fewer KV heads
than ranks, tied embeddings, a vocabulary not divisible by 4), each rank's loaded bytes, the FSDP2 -> TP
hand-off against an engine loaded from the exported checkpoint, and sample.py as 2 replicas x TP 2
against 1 process. The plan's arithmetic is checked by hand in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from selfreward.infer.engine import Engine
from selfreward.infer.parallel import local_heads, shard_plan, vocab_range
from selfreward.model.checkpoint import load_model, save_model
from selfreward.model.config import ModelConfig
from hf_tiny import make_hf_checkpoint
from tp_worker import run_engine

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# name, family, checkpoint overrides, TP degree, replica of the 2 x TP 2 layout that runs it (None: TP 4)
CASES = [("llama3", "llama3", {}, 2, 0),
         ("mistral", "mistral", {}, 2, 1),                                 # re-saved as a sharded set of files
         ("qwen2", "qwen2", {}, 2, 0),
         ("gqa_kv1_tied", "llama_tied", {"kv_heads": 1}, 2, 1),          # 1 KV head on 2 ranks
         ("tp4_qwen2_tied_v130", "qwen2_tied", {"vocab": 130}, 4, None)]  # 2 KV heads on 4 ranks


def test_plan_by_hand():
    cfg = ModelConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                      vocab_size=130, num_hidden_layers=1)
    assert local_heads(cfg, 8) == (1, 1) and local_heads(cfg, 2) == (4, 1)
    hd = 8
    for r in range(8):   # query head r reads KV head r // (8 / 2) under GQA: the rank holds exactly that one
        p = shard_plan(cfg, r, 8)
        assert p["layers.0.attention.wq.weight"] == (0, r * hd, (r + 1) * hd)
        assert p["layers.0.attention.wk.weight"] == (0, (r // 4) * hd, (r // 4 + 1) * hd)
        assert p["layers.0.attention.wo.weight"] == (1, r * hd, (r + 1) * hd)
        assert p["layers.0.feed_forward.w2.weight"] == (1, r * 12, (r + 1) * 12)
    assert [vocab_range(cfg, r, 4) for r in range(4)] == [(0, 33, 33), (33, 66, 33), (66, 99, 33), (99, 130, 33)]
    with pytest.raises(ValueError, match="num_attention_heads 8 is not divisible by tensor parallel 3"):
        local_heads(cfg, 3)
    with pytest.raises(ValueError, match="tensor parallel 6 is not a multiple of num_key_value_heads 4"):
        local_heads(ModelConfig(hidden_size=96, num_attention_heads=12, num_key_value_heads=4), 6)
    with pytest.raises(ValueError, match="num_key_value_heads 6 is not divisible by tensor parallel 4"):
        local_heads(ModelConfig(hidden_size=96, num_attention_heads=12, num_key_value_heads=6), 4)


def test_sample_cli_refuses_tp_not_dividing_world(tmp_path, capsys):
    from selfreward.infer import sample as cli
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x"}\n')
    assert cli.main(["--model", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                     "--tensor-parallel", "2"]) == 2
    assert "error: --tensor-parallel 2 does not divide WORLD_SIZE 1" in capsys.readouterr().err


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 11, 1)]


def _batch(prompts):   # right padding: positions of real tokens are 0.. in transformers too
    T = max(map(len, prompts))
    ids = [p + [0] * (T - len(p)) for p in prompts]
    return ids, [[1] * len(p) + [0] * (T - len(p)) for p in prompts]


def _hf_reference(ck: Path, case: dict) -> dict:
    """transformers' own argmax loop (no cache) and its logits on the padded batch."""
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    greedy = []
    with torch.no_grad():
        for p in case["prompts"]:
            ids = list(p)
            for _ in range(case["steps"]):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            greedy.append(ids[len(p):])
        logits = hf(torch.tensor(case["batch_ids"]), attention_mask=torch.tensor(case["batch_mask"])).logits
    return {"greedy": greedy, "logits": logits}


def _file_bytes(ck: Path) -> tuple[int, int, int]:
    """-> (bytes of all tensors, of the k/v projections, of the norms)."""
    n = {}
    for file in ck.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            n.update({k: f.get_tensor(k).numel() * 4 for k in f.keys()})
    return (sum(n.values()), sum(v for k, v in n.items() if "k_proj" in k or "v_proj" in k),
            sum(v for k, v in n.items() if "norm" in k))


def _same_outputs(a: dict, b: dict, tol: float) -> None:
    assert a["greedy"] == b["greedy"] and a["sampled"] == b["sampled"]
    for k in ("sampled_logprobs", "score", "next"):
        torch.testing.assert_close(torch.tensor(a[k]).flatten(), torch.tensor(b[k]).flatten(), atol=tol, rtol=0)


def test_tp_torchrun_four_ranks(tmp_path):
    from selfreward.infer import sample as cli
    from hf_tokenizer import make_hf_tokenizer
    spec: dict = {"cases": []}
    for name, fam, over, tp, replica in CASES:
        ck = make_hf_checkpoint(tmp_path / name, fam, **over)
        if name == "mistral":
            save_model(load_model(ck), ModelConfig.from_json(ck), ck, max_shard_bytes=60_000)
            assert len(list(ck.glob("model-*.safetensors"))) > 3 and not (ck / "model.safetensors").exists()
        prompts = _prompts(over.get("vocab", 128))
        ids, mask = _batch(prompts)
        spec["cases"].append(dict(name=name, ckpt=str(ck), tp=tp, replica=replica, prompts=prompts, steps=8,
                                  batch_ids=ids, batch_mask=mask))
    hck = make_hf_checkpoint(tmp_path / "handoff", "qwen2", kv_heads=1)
    hcase = dict(spec["cases"][2], name="handoff", ckpt=None)
    spec["handoff"] = dict(ckpt=str(hck), export=str(tmp_path / "exported"), case=hcase,
                           train_ids=torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1)).tolist())
    sck = make_hf_checkpoint(tmp_path / "cli", "llama3", vocab=304)
    make_hf_tokenizer(sck, vocab=300)
    reqs = [{"id": i, "prompt": t} for i, t in enumerate(["Once upon a time", "The cat", "What is two",
                                                         "Be brief", "Sort these"])]
    reqs.append({"id": "m", "messages": [{"role": "user", "content": "Tell me a story."}]})
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    args = ["--model", str(sck), "--input", str(inp), "--num-samples", "2", "--temperature", "0.8",
            "--top-p", "0.9", "--max-tokens", "8", "--seed", "1", "--logprobs"]
    spec["sample_argv"] = args + ["--output", str(tmp_path / "four.jsonl"), "--tensor-parallel", "2"]
    # a killed earlier run left replica 1's shard with prompt 1 done: its leader skips it, its follower must
    # follow the leader's batches (not the whole shard), or the two ranks' collectives would not match
    planted = [{"id": 1, "sample": j, "text": "PLANTED", "token_ids": [5], "finish_reason": "length",
                "logprobs": [0.0]} for j in (0, 1)]
    (tmp_path / "four.jsonl.rank1.partial").write_text("".join(json.dumps(r) + "\n" for r in planted))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "spec.json"), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # meanwhile, the references: transformers, the 1-rank engine, the 1-process CLI
        refs = {}
        for case in spec["cases"]:
            ck = Path(case["ckpt"])
            one = run_engine(Engine(load_model(ck), block_size=4, num_blocks=64), case)
            refs[case["name"]] = (one, _hf_reference(ck, case), _file_bytes(ck))
        assert cli.main(args + ["--output", str(tmp_path / "one.jsonl")]) == 0
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all((out / f"rank{r}.rc").read_text() == "0" for r in range(4))

    for name, fam, over, tp, replica in CASES:
        one, hf, (full, kv_full, norms) = refs[name]
        group = [r[name] for r in ranks if name in r]
        assert len(group) == tp, name
        for got in group:
            assert got == group[0] | {"bytes": got["bytes"]}, name     # every rank of a group: same outputs
        got = group[0]
        assert got["greedy"] == one["greedy"] == hf["greedy"], name   # TP == TP 1 == transformers
        _same_outputs(got, one, 1e-5)                                  # seeded sampling, log-probs, scores
        mask = torch.tensor(spec["cases"][[c[0] for c in CASES].index(name)]["batch_mask"]).bool()
        torch.testing.assert_close(torch.tensor(got["logits"])[mask], hf["logits"][mask], atol=1e-4, rtol=1e-4)
        cfg = ModelConfig.from_json(Path(tmp_path / name))
        nkv = cfg.num_key_value_heads
        assert got["pool_kv_heads"] == max(1, nkv // tp)               # each rank's KV pool: its heads only
        per_rank = [g["bytes"] for g in group]
        print(f"[tp] {name}: TP {tp}, loaded bytes per rank {per_rank} of {full} ({max(per_rank) / full:.3f})")
        if nkv >= tp:                            # an exact partition of the file, but for the replicated norms
            assert sum(per_rank) == full + (tp - 1) * norms, (name, per_rank, full)
            assert max(per_rank) <= full / tp * 1.02, (name, per_rank, full)
        else:   # a rank reads one KV head (kv_full / nkv), the rest 1/tp (+ padding and norms: 2%)
            assert max(per_rank) <= (full - kv_full) / tp * 1.02 + kv_full / nkv, (name, per_rank, full)

    for r in ranks:   # hand-off from the FSDP2 trainer == an engine loaded from its export (same TP layout)
        h, e = dict(r["handoff"]), r["exported"]
        print(f"[handoff] FSDP2 (4 ranks) -> TP 2: {h.pop('seconds') * 1e3:.1f} ms")
        assert h == e
    exported = load_model(tmp_path / "exported")
    one = run_engine(Engine(exported, block_size=4, num_blocks=64), hcase)
    assert ranks[0]["exported"]["greedy"] == one["greedy"]
    _same_outputs(ranks[0]["exported"], one, 1e-5)
    original = run_engine(Engine(load_model(hck), block_size=4, num_blocks=64), hcase)
    assert original["logits"] != one["logits"]                         # the trainer's step changed the weights

    strip = lambda rs: [(x["id"], x["sample"], x["text"], x["token_ids"], x["finish_reason"]) for x in rs]  # noqa: E731
    four = [json.loads(x) for x in (tmp_path / "four.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r for r in four if r["id"] == 1] == planted
    four = [r for r in four if r["id"] != 1]
    one = [r for r in one if r["id"] != 1]
    assert strip(four) == strip(one) and len(four) == 10
    for a, b in zip(four, one):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    assert [p.name for p in tmp_path.glob("four.jsonl.*")] == ["four.jsonl.meta.json"] and "rank 3/4" in log
