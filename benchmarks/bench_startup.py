"""Start-up to the first token, as a user meets it: whole processes, ours vs Hugging Face.

    python benchmarks/bench_startup.py --runs 3

ours: `python infer/sample.py` on a one-request JSONL (max tokens 1), process start to exit. HF: a process
that imports transformers, loads the same checkpoint (AutoModelForCausalLM, fp32) and generates one token.
Same random ~56M Llama as benchmarks/bench_sample.py (hidden 512, 8 layers, vocab 32000) with a word-level
tokenizer. Also prints our phases in-process (import, load, engine, first token). Threads: the environment's
default unless --threads. Medians over --runs, ours and HF alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_startup"

HF = """
import time, torch, transformers as tf
m = tf.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32).eval()
ids = torch.tensor([[1, 5, 6, 7]])
m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
"""

PHASES = """
import time; t0 = time.perf_counter()
from selfreward.infer.config import EngineConfig, load_engine
from selfreward.infer.sequence import SamplingParams
t1 = time.perf_counter()
from selfreward.model.checkpoint import load_model
m = load_model({path!r}); t2 = time.perf_counter()
from selfreward.infer.engine import Engine
e = Engine(m); t3 = time.perf_counter()
e.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=1)); t4 = time.perf_counter()
print(f"import {{t1-t0:.2f}} s, load {{t2-t1:.2f}} s, engine {{t3-t2:.2f}} s, first token {{t4-t3:.2f}} s")
"""


def model_dir() -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_dpo
    bench_dpo.CACHE = CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    bench_dpo.make_checkpoint(CACHE / "model")
    bench_dpo.PROMPT, bench_dpo.RESP = 4, 2
    model, _ = bench_dpo.make_cli_inputs(CACHE, 1)
    return model


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: the environment's)")
    a = ap.parse_args()
    model = model_dir()
    req = CACHE / "one.jsonl"
    req.write_text(json.dumps({"id": 0, "prompt": "<5> <6> <7>"}) + "\n")
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    ours_cmd = [sys.executable, str(ROOT / "infer" / "sample.py"), "--model", str(model), "--input", str(req),
                "--output", str(CACHE / "out.jsonl"), "--max-tokens", "1"]
    hf_cmd = [sys.executable, "-c", HF.format(path=str(model))]
    ours, hf = [], []
    load0 = os.getloadavg()
    for _ in range(a.runs):
        (CACHE / "out.jsonl").unlink(missing_ok=True)
        ours.append(timed(ours_cmd, env))
        hf.append(timed(hf_cmd, env))
    torch_only = timed([sys.executable, "-c", "import torch"], env)
    phases = subprocess.run([sys.executable, "-c", PHASES.format(path=str(model))], env=env, cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"load average before {load0}, after {os.getloadavg()}; threads "
          f"{a.threads or os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"ours (infer/sample.py, 1 request, 1 token): median {statistics.median(ours):.2f} s  runs {ours}")
    print(f"HF (import transformers, from_pretrained, generate 1 token): median {statistics.median(hf):.2f} s  "
          f"runs {hf}")
    print(f"`python -c 'import torch'` alone: {torch_only:.2f} s; our phases in one process: {phases}")


if __name__ == "__main__":
    main()
