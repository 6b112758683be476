"""`python infer/sample.py` vs a Hugging Face `generate` script, as users run them: whole processes,
start-up included, the default environment (threads as torch sets them), the same requests.

    python benchmarks/bench_sample_e2e.py --runs 3 [--only short,long,judge]

Model: the random 56M Llama of benchmarks/bench_startup.py (hidden 512, 8 layers, 8 heads, 4 KV heads,
vocab 32000, fp32) with a word-level tokenizer (word "<i>" = token i), so both sides tokenize the same text
to the same ids. EOS is ignored on both sides (random weights): lengths come from max tokens.

Workloads (issue 20):
  short  32 prompts of 16-128 tokens, N = 4, temperature 0.7, top-p 0.9, max tokens 32-128 per request
  long   the bench_sample.py candidates shape: prompts of 16-256 tokens, max tokens 32-256 (--long-prompts)
  judge  96 requests = one 320-token shared prefix + 32-96 distinct tokens, 16 greedy new tokens

ours: `infer/sample.py --raw-prompt --ignore-eos` on a JSONL with per-request max_tokens (BOS + the text).
HF (the child script below, a process of its own): import transformers, AutoTokenizer + AutoModelForCausalLM
(fp32), then, as a user batches: HF_BATCH prompts per `generate` call, each repeated N times, left-padded,
max_new_tokens = the batch's largest request (min_new_tokens the same), then decode every row and write a
JSONL. Each run times ours then HF back to back; the ratio is the median over runs of HF time / ours.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_sample_e2e"
VOCAB = 32000

HF_CHILD = r"""
import json, sys, torch, transformers as tf
spec = json.loads(sys.argv[1])
tok = tf.AutoTokenizer.from_pretrained(spec["model"])
m = tf.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
m.generation_config.eos_token_id = None
m.generation_config.pad_token_id = 0
reqs = [json.loads(x) for x in open(spec["input"])]
n, hb, out = spec["n"], spec["hf_batch"], open(spec["output"], "w")
kw = dict(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=0) \
    if spec["temperature"] > 0 else dict(do_sample=False)
for s in range(0, len(reqs), hb):
    batch = reqs[s:s + hb]
    ids = [[tok.bos_token_id] + tok.encode(r["prompt"], add_special_tokens=False) for r in batch]
    rows = [p for p in ids for _ in range(n)]
    T = max(map(len, rows))
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(rows):
        x[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    new = max(r["max_tokens"] for r in batch)
    with torch.no_grad():
        y = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)[:, T:]
    for i, r in enumerate(batch):
        for j in range(n):
            t = y[i * n + j, :r["max_tokens"]].tolist()
            out.write(json.dumps({"id": r["id"], "sample": j, "text": tok.decode(t), "token_ids": t}) + "\n")
out.close()
"""


def workload(name: str, long_prompts: int) -> tuple[list[dict], dict]:
    """-> (requests, settings). Prompts are BOS + L-1 random words (L drawn in the shape's range)."""
    rng = random.Random({"short": 1, "long": 2, "judge": 3}[name])
    words = lambda k: " ".join(f"<{rng.randrange(3, VOCAB)}>" for _ in range(k))   # noqa: E731
    if name == "judge":
        prefix = words(319)
        reqs = [{"id": i, "prompt": prefix + " " + words(rng.randint(32, 96)), "max_tokens": 16}
                for i in range(96)]
        return reqs, {"n": 1, "temperature": 0.0, "top_p": 1.0}
    count, (lo, hi), (mlo, mhi) = ((32, (16, 128), (32, 128)) if name == "short"
                                   else (long_prompts, (16, 256), (32, 256)))
    reqs = [{"id": i, "prompt": words(rng.randint(lo, hi) - 1), "max_tokens": rng.randint(mlo, mhi)}
            for i in range(count)]
    return reqs, {"n": 4, "temperature": 0.7, "top_p": 0.9}


def model_dir() -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_startup
    return bench_startup.model_dir()


def run(cmd: list[str], out: Path, expect: int) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    got = sum(len(json.loads(x)["token_ids"]) for x in out.read_text().splitlines())
    if got != expect:
        raise SystemExit(f"{cmd[1]}: {got} tokens generated, expected {expect}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="short,long,judge")
    ap.add_argument("--long-prompts", type=int, default=32, help="prompts in the long shape")
    ap.add_argument("--hf-batch", type=int, default=16, help="prompts per HF generate call (rows: x N)")
    ap.add_argument("--out", default=None, help="append one JSON line per workload here")
    a = ap.parse_args()
    model = model_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
          flush=True)
    for name in a.only.split(","):
        reqs, st = workload(name, a.long_prompts)
        inp, o_ours, o_hf = CACHE / f"{name}.jsonl", CACHE / f"{name}.ours.jsonl", CACHE / f"{name}.hf.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
        expect = st["n"] * sum(r["max_tokens"] for r in reqs)
        ours_cmd = [sys.executable, "infer/sample.py", "--model", str(model), "--input", str(inp), "--output",
                    str(o_ours), "--n", str(st["n"]), "--temperature", str(st["temperature"]), "--top-p",
                    str(st["top_p"]), "--raw-prompt", "--ignore-eos", "--overwrite"]
        spec = dict(st, model=str(model), input=str(inp), output=str(o_hf), hf_batch=a.hf_batch)
        hf_cmd = [sys.executable, "-c", HF_CHILD, json.dumps(spec)]
        ours, hf = [], []
        load0 = os.getloadavg()[0]
        for r in range(a.runs):
            ours.append(run(ours_cmd, o_ours, expect))
            hf.append(run(hf_cmd, o_hf, expect))
            print(f"  {name} run {r}: ours {ours[-1]:.2f} s  HF {hf[-1]:.2f} s", flush=True)
        ratio = statistics.median(h / o for o, h in zip(ours, hf))
        res = {"workload": name, "requests": len(reqs), **st, "generated_tokens": expect,
               "ours_s": statistics.median(ours), "hf_s": statistics.median(hf), "speedup": ratio,
               "ours_all": [round(x, 2) for x in ours], "hf_all": [round(x, 2) for x in hf],
               "load_before": load0, "load_after": os.getloadavg()[0]}
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
