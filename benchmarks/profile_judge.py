"""Where our engine's judge decode goes (issue 30): bench_vllm.py's judge shape (48 requests; run bench_vllm.py
once first, it writes .cache/bench_vllm/judge.json), a prefill-only call and a 25-token call (their difference /
24 = one decode step), then the 25-token call again under torch.profiler: the top ops by self CPU time.

    OMP_NUM_THREADS=2 python benchmarks/profile_judge.py --model /tmp/smollm2-hf [--dtype bfloat16]
"""
import argparse
import time
from pathlib import Path

import vllm_engines as ve

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench_vllm"


def timed(eng, reqs, max_tokens: int) -> float:
    for r in reqs:
        r.max_tokens = max_tokens
    eng.reset()                                     # an empty prefix cache, as bench_vllm's steady calls
    t = time.perf_counter()
    eng.generate(reqs)
    return time.perf_counter() - t


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    spec = ve.Spec(engine="ours", model=a.model, requests=str(CACHE / "judge.json"), dtype=a.dtype)
    eng, reqs = ve.ENGINES["ours"](spec), ve.read_requests(spec.requests)
    pre, full = timed(eng, reqs, 1), timed(eng, reqs, 25)
    print(f"prefill-only call {pre:.1f} s; 25 tokens {full:.1f} s; decode {(full - pre) / 24 * 1000:.0f} ms a step")
    eng.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(reqs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))


if __name__ == "__main__":
    main()
