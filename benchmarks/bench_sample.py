"""Our engine vs Hugging Face `generate` on the same weights, prompts and settings, in one process.

    python benchmarks/bench_sample.py [--quick] [--runs 3] [--threads 2] [--only candidates,judge,batch]

Model: the ~50M Llama config (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408, vocab 32000),
random weights (seed 0), fp32, CPU. With random weights EOS is ignored on both sides and lengths are set
by max_tokens. HF is driven the way a user would: batched, left-padded, one generate call per batch, N
samples by repeating prompts, max_new_tokens = the batch's largest request; HF's tokens/s counts only the
tokens each request asked for (what a user keeps). Both sides run interleaved (ours, HF, ours, HF...) and
medians are reported, because the machine is shared.

Sections:
  candidates  P prompts of 16-256 tokens, N=4, temperature 0.7, top-p 0.9, max tokens drawn from 32-256
  judge       R requests = one shared rubric prefix (>= 300 tokens) + a distinct 32-96 token tail, 16 greedy
              tokens each: prefill tokens computed with / without the prefix cache, and the wall-time ratio
  batch       greedy generated tokens/s at batch 1, 8, 64 (128-token prompts), ours vs HF
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfreward.infer.engine import Engine
from selfreward.infer.sequence import SamplingParams
from selfreward.model.checkpoint import load_model, save_model
from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer

CFG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


def build(tmp: Path):
    import transformers as tf
    cfg = ModelConfig(**CFG)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    save_model(m, cfg, tmp / "m")
    ours = load_model(tmp / "m").eval()
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp / "m", torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None       # random weights: lengths come from max tokens
    hf.generation_config.pad_token_id = 0
    return ours, hf


def rand_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, CFG["vocab_size"], (L,), generator=g).tolist() for L in lens]


def hf_generate(hf, prompts: list[list[int]], max_new: int, **kw) -> None:
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, **kw)


def ratio(ours: list[float], hf: list[float]) -> float:
    """Median over runs of HF time / our time (each run's pair ran back to back under the same load)."""
    return statistics.median(h / o for o, h in zip(ours, hf))


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def candidates(ours, hf, args, out: list[dict]) -> None:
    P, N = args.prompts, 4
    prompts = rand_prompts(P, 16, 256, seed=1)
    g = torch.Generator().manual_seed(2)
    max_toks = torch.randint(32, 257, (P,), generator=g).tolist()
    useful = N * sum(max_toks)
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=m, seed=i, ignore_eos=True)
              for i, m in enumerate(max_toks)]
    hb = args.hf_batch                                     # prompts per HF call (x N rows)

    def run_ours(eng):
        res = eng.generate(prompts, params, n=N)
        assert sum(len(c.token_ids) for r in res for c in r) == useful

    def run_hf():
        for s in range(0, P, hb):
            batch = [p for p in prompts[s:s + hb] for _ in range(N)]
            hf_generate(hf, batch, max(max_toks[s:s + hb]), do_sample=True, temperature=0.7, top_p=0.9, top_k=0)

    ts_o, ts_h = [], []
    for r in range(args.runs):
        eng = Engine(ours, max_num_seqs=256)    # a fresh engine (empty prefix cache), built outside the timing
        ts_o.append(timed(lambda: run_ours(eng)))
        ts_h.append(timed(run_hf))
        print(f"  candidates run {r}: ours {ts_o[-1]:.1f}s  HF {ts_h[-1]:.1f}s", file=sys.stderr, flush=True)
    o, h = statistics.median(ts_o), statistics.median(ts_h)
    out.append({"section": "candidates", "speedup_per_run_median": ratio(ts_o, ts_h), "prompts": P, "n": N, "useful_tokens": useful, "hf_batch_rows": hb * N,
                "ours_s": o, "hf_s": h, "ours_tok_s": useful / o, "hf_tok_s": useful / h, "speedup": h / o,
                "runs": args.runs, "ours_all": ts_o, "hf_all": ts_h})


def judge(ours, hf, args, out: list[dict]) -> None:
    R = args.judge_requests
    rubric = rand_prompts(1, 320, 320, seed=3)[0]
    tails = rand_prompts(R, 32, 96, seed=4)
    prompts = [rubric + t for t in tails]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    res = {}
    for r in range(args.runs):
        for cache in (True, False):
            eng = Engine(ours, max_num_seqs=256, prefix_cache=cache)   # built outside the timing
            t = timed(lambda: eng.generate(prompts, sp))
            res.setdefault(cache, []).append((t, eng.stats["prefill_computed"]))
            print(f"  judge run {r} cache={cache}: {t:.1f}s, {eng.stats['prefill_computed']} prefill tokens",
                  file=sys.stderr, flush=True)
    w, wo = statistics.median(t for t, _ in res[True]), statistics.median(t for t, _ in res[False])
    pw, pwo = res[True][0][1], res[False][0][1]
    out.append({"section": "judge", "requests": R, "rubric_tokens": len(rubric),
                "prefill_with_cache": pw, "prefill_without_cache": pwo, "saved": 1 - pw / pwo,
                "wall_with_s": w, "wall_without_s": wo, "wall_ratio": w / wo, "runs": args.runs})


def batch(ours, hf, args, out: list[dict]) -> None:
    for B in args.batches:
        prompts = rand_prompts(B, 128, 128, seed=5 + B)
        T = args.batch_tokens
        sp = SamplingParams(temperature=0, max_tokens=T, ignore_eos=True)
        ts_o, ts_h = [], []
        for r in range(args.runs):
            eng = Engine(ours, max_num_seqs=256)
            ts_o.append(timed(lambda: eng.generate(prompts, sp)))
            ts_h.append(timed(lambda: hf_generate(hf, prompts, T, do_sample=False)))
            print(f"  batch {B} run {r}: ours {ts_o[-1]:.1f}s  HF {ts_h[-1]:.1f}s", file=sys.stderr, flush=True)
        o, h = statistics.median(ts_o), statistics.median(ts_h)
        out.append({"section": f"batch{B}", "speedup_per_run_median": ratio(ts_o, ts_h), "batch": B, "new_tokens": T, "ours_tok_s": B * T / o,
                    "hf_tok_s": B * T / h, "speedup": h / o, "runs": args.runs, "ours_all": ts_o, "hf_all": ts_h})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 candidate prompts, 64 judge requests, 64 new tokens")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="candidates,judge,batch")
    ap.add_argument("--hf-batch", type=int, default=16, help="prompts per HF generate call (rows = x4)")
    ap.add_argument("--out", default=None, help="append result JSON lines here")
    args = ap.parse_args(argv)
    args.prompts = 16 if args.quick else 64
    args.judge_requests = 64 if args.quick else 256
    args.batch_tokens = 64 if args.quick else 128
    args.batches = [1, 8, 64]
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} load={os.getloadavg()} args={vars(args)}", file=sys.stderr)
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build(Path(tmp))
        for name in args.only.split(","):
            n0 = len(out)
            {"candidates": candidates, "judge": judge, "batch": batch}[name](ours, hf, args, out)
            for r in out[n0:]:              # (batch: one line per batch size)
                print(json.dumps(r), flush=True)
    print(f"load after: {os.getloadavg()}", file=sys.stderr)
    if args.out:
        with open(args.out, "a") as f:
            for r in out:
                f.write(json.dumps(dict(r, threads=args.threads, quick=args.quick)) + "\n")


if __name__ == "__main__":
    main()
