"""Kernel benchmarks: Triton vs PyTorch eager vs torch.compile (vs flash-attn), and the log-prob memory figure.

    python benchmarks/bench_kernels.py              # CUDA: timings; CPU: an interpreter correctness pass
    python benchmarks/bench_kernels.py --memory     # fused vs naive log-prob peak memory (CPU is fine)

On CUDA each case prints the median time over several runs (triton.testing.do_bench), the bytes the op
must move divided by that time (GB/s), and its FLOPs per second (TFLOP/s). Byte and FLOP counts are the
algorithmic minimum (each input read once, each output written once), so GB/s is comparable to the
3.35 TB/s HBM3 roof of an H100 SXM and TFLOP/s to its 989 dense bf16 TFLOP/s (benchmarks/README.md).

--memory runs each variant (naive `log_softmax(h @ W.T).gather`, our chunked twin, and optionally the
Triton path) forward+backward in a fresh subprocess and reports the peak resident-memory growth over
the inputs, read from the kernel's own high-water mark (VmHWM after resetting it via clear_refs), so it
counts every torch CPU allocation (glibc's mmap threshold is pinned to 64 KiB in the child so freed
tensors leave RSS at once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

import selfreward.kernels.ops as K


# ---------------------------------------------------------------- memory of the fused log-prob
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _variant_fwd_bwd(variant: str, h, w, t, chunk: int) -> torch.Tensor:
    if variant == "naive":
        logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None])[:, 0]
    elif variant == "twin":
        logp = K.linear_logprobs_ref(h, w, t, chunk=chunk)
    elif variant == "triton":
        from selfreward.kernels.logprobs_triton import linear_logprobs_triton
        logp = linear_logprobs_triton(h, w, t, chunk=chunk)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    logp.sum().backward()
    return logp.detach()


def memory_child(variant: str, N: int, V: int, H: int, chunk: int) -> dict:
    """Runs in a fresh process: warm-up on tiny inputs (BLAS, autograd threads), the real inputs, then
    reset the high-water mark and run one forward+backward."""
    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    _variant_fwd_bwd(variant, torch.randn(16, H, requires_grad=True),
                     torch.randn(64, H, requires_grad=True), torch.randint(0, 64, (16,)), 8)  # warm-up
    try:
        Path("/proc/self/clear_refs").write_text("5")             # reset VmHWM to the current RSS
    except OSError:   # not permitted here: VmHWM keeps the start-up peak, which is far below these sizes
        pass
    base = _rss_kb("VmRSS")
    logp = _variant_fwd_bwd(variant, h, w, t, chunk)
    peak = _rss_kb("VmHWM")
    return {"variant": variant, "N": N, "V": V, "H": H, "chunk": chunk,
            "peak_delta_mib": (peak - base) / 1024, "logp_sum": float(logp.sum())}


def measure_memory(N: int, V: int, H: int, chunk: int, variants=("naive", "twin")) -> dict[str, dict]:
    out = {}
    for v in variants:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        # a fixed glibc mmap threshold: every tensor above 64 KiB gets its own mapping and is returned to
        # the OS when freed, so RSS follows live torch allocations (the default dynamic threshold keeps
        # freed multi-MiB chunks in the heap, which inflates RSS for the chunked variant)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        if v == "triton" and not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        r = subprocess.run([sys.executable, __file__, "--memory-child", v, str(N), str(V), str(H), str(chunk)],
                           capture_output=True, text=True, env=env, check=True)
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- CPU: interpreter correctness pass
def interpreter_pass() -> bool:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)                  # noqa: E731
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    x, w = rnd(7, 37), rnd(37)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = K.rope_cos_sin(inv, torch.arange(9) % 4)
    hq, wv, tg = rnd(37, 24), rnd(1000, 24) / 5, torch.randint(0, 1000, (37,), generator=g)
    q, kk, vv = rnd(31, 4, 64), rnd(31, 2, 64), rnd(31, 2, 64)
    cases = {
        "rmsnorm": (lambda f: f(x, w, 1e-5), K.rmsnorm, K.rmsnorm_ref),
        "swiglu": (lambda f: f(x, w.expand_as(x)), K.swiglu, K.swiglu_ref),
        "rope": (lambda f: f(rnd(9, 3, 64), cos, sin), K.rope, K.rope_ref),
        "linear_logprobs": (lambda f: f(hq, wv, tg, 16), K.linear_logprobs, K.linear_logprobs_ref),
        "attention": (lambda f: f(q, kk, vv, cu, 17), K.attention, K.attention_ref),
    }
    ok = True
    for name, (call, fast, ref) in cases.items():
        g.manual_seed(1)
        a = call(fast)
        g.manual_seed(1)                                             # same random inputs for the twin
        b = call(ref)
        err = (a - b).abs().max().item()
        ok &= err < 1e-4
        print(f"  {name:16s} max |triton - twin| = {err:.2e}  {'ok' if err < 1e-4 else 'MISMATCH'}")
    print("  (full forward + gradient coverage: TRITON_INTERPRET=1 pytest tests/test_kernels*.py)")
    return ok


# ---------------------------------------------------------------- CUDA timings
def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _row(name: str, impl: str, ms: float, nbytes: float, flops: float) -> None:
    print(f"{name:26s} {impl:14s} {ms:9.4f} ms {nbytes / ms / 1e6:9.1f} GB/s {flops / ms / 1e9:8.2f} TFLOP/s")


def _compare(name: str, impls: dict, nbytes: float, flops: float) -> None:
    for impl, fn in impls.items():
        try:
            _row(name, impl, _bench(fn), nbytes, flops)
        except Exception as e:      # e.g. torch.compile unavailable: report, keep going
            print(f"{name:26s} {impl:14s} failed: {type(e).__name__}: {str(e)[:80]}")


def _fwd_bwd(f, *inputs):
    def run():
        out = f(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def cuda_benchmarks(dtype=torch.bfloat16) -> None:
    from selfreward.kernels.attention_triton import _FlashAttn
    from selfreward.kernels.logprobs_triton import linear_logprobs_triton
    from selfreward.kernels.paged_triton import paged_decode_triton, store_kv_triton
    dev, es = "cuda", torch.empty((), dtype=dtype).element_size()
    comp = lambda f: torch.compile(f, dynamic=False)             # noqa: E731
    print(f"{torch.cuda.get_device_name()}  dtype={dtype}")
    print(f"{'case':26s} {'impl':14s} {'time':>12s} {'bandwidth':>14s} {'compute':>16s}")

    M, H, I = 16384, 4096, 14336
    x = torch.randn(M, H, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(H, device=dev, dtype=dtype, requires_grad=True)
    _compare("rmsnorm fwd [16k,4096]", {"triton": lambda: K.rmsnorm(x, w, 1e-5),
                                         "eager": lambda: K.rmsnorm_ref(x, w, 1e-5),
                                         "compile": lambda f=comp(K.rmsnorm_ref): f(x, w, 1e-5)},
             2 * M * H * es, 4 * M * H)
    _compare("rmsnorm fwd+bwd", {"triton": _fwd_bwd(lambda: K.rmsnorm(x, w, 1e-5)),
                                 "eager": _fwd_bwd(lambda: K.rmsnorm_ref(x, w, 1e-5)),
                                 "compile": _fwd_bwd(lambda f=comp(K.rmsnorm_ref): f(x, w, 1e-5))},
             5 * M * H * es, 10 * M * H)
    gt = torch.randn(M // 4, I, device=dev, dtype=dtype, requires_grad=True)
    up = torch.randn(M // 4, I, device=dev, dtype=dtype, requires_grad=True)
    n = gt.numel()
    _compare("swiglu fwd [4k,14336]", {"triton": lambda: K.swiglu(gt, up), "eager": lambda: K.swiglu_ref(gt, up),
                                       "compile": lambda f=comp(K.swiglu_ref): f(gt, up)}, 3 * n * es, 5 * n)
    _compare("swiglu fwd+bwd", {"triton": _fwd_bwd(K.swiglu, gt, up), "eager": _fwd_bwd(K.swiglu_ref, gt, up),
                                "compile": _fwd_bwd(comp(K.swiglu_ref), gt, up)}, 8 * n * es, 15 * n)
    N, nh, D = 16384, 32, 128
    xr = torch.randn(N, nh, D, device=dev, dtype=dtype, requires_grad=True)
    cos, sin = K.rope_cos_sin(torch.rand(D // 2, device=dev), torch.arange(N, device=dev) % 4096)
    _compare("rope fwd [16k,32,128]", {"triton": lambda: K.rope(xr, cos, sin), "eager": lambda: K.rope_ref(xr, cos, sin),
                                       "compile": lambda f=comp(K.rope_ref): f(xr, cos, sin)},
             2 * xr.numel() * es + 2 * cos.numel() * 4, 3 * xr.numel())
    Nl, V, Hl = 8192, 128256, 4096
    hl = torch.randn(Nl, Hl, device=dev, dtype=dtype, requires_grad=True)
    wl = (torch.randn(V, Hl, device=dev, dtype=dtype) / 64).requires_grad_(True)
    tl_ = torch.randint(0, V, (Nl,), device=dev)
    naive = lambda h, w, t: torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]  # noqa: E731
    _compare("logprobs fwd+bwd 8k x 128k", {
        "triton": _fwd_bwd(lambda: linear_logprobs_triton(hl, wl, tl_, 4096)),
        "twin(eager)": _fwd_bwd(lambda: K.linear_logprobs_ref(hl, wl, tl_, 4096)),
        "naive(eager)": _fwd_bwd(lambda: naive(hl, wl, tl_)),
        "naive(compile)": _fwd_bwd(lambda f=comp(naive): f(hl, wl, tl_))},
             (2 * Nl * Hl + 2 * V * Hl) * es, 8 * Nl * V * Hl)          # fwd + recompute + 2 backward GEMMs
    for D in (64, 128):
        lens = [4096] * 4
        Hq, Hkv = 4096 // D, 8
        Na = sum(lens)
        cu = torch.tensor([0, 4096, 8192, 12288, 16384], device=dev, dtype=torch.int32)
        q = torch.randn(Na, Hq, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(Na, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(Na, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        fl = 4 * sum(L * L / 2 for L in lens) * Hq * D                  # causal forward FLOPs
        impls = {"triton": lambda: _FlashAttn.apply(q, k, v, cu, 4096, D ** -0.5),
                 "sdpa(eager)": lambda: K.attention_ref(q, k, v, cu, 4096),
                 "sdpa(compile)": lambda f=comp(K.attention_ref): f(q, k, v, cu, 4096)}
        try:
            from flash_attn import flash_attn_varlen_func
            impls["flash-attn"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, 4096, 4096, causal=True)
        except ImportError:
            print("flash-attn not installed: skipped in the comparison")
        _compare(f"attention fwd hd{D} 4x4k", impls, 2 * (q.numel() + k.numel() + v.numel()) * es, fl)
        _compare(f"attention fwd+bwd hd{D}", {n_: _fwd_bwd(f) for n_, f in impls.items()},
                 4 * (q.numel() + k.numel() + v.numel()) * es, 3.5 * fl)
    B, ctx, bs, Hq, Hkv, D = 64, 4096, 16, 32, 8, 128
    nb = B * ctx // bs
    kc = torch.randn(nb, bs, Hkv, D, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32).view(B, -1)
    cl = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    qd = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    _compare("paged decode 64 x 4k", {"triton": lambda: paged_decode_triton(qd, kc, vc, bt, cl),
                                      "twin(eager)": lambda: K.paged_decode_ref(qd, kc, vc, bt, cl)},
             2 * kc.numel() * es, 4 * B * ctx * Hq * D)
    kn, vn = torch.randn(B, Hkv, D, device=dev, dtype=dtype), torch.randn(B, Hkv, D, device=dev, dtype=dtype)
    slots = bt[:, 5].long() * bs + 3                              # one new token per sequence
    _compare("paged store 64 tokens", {"triton": lambda: store_kv_triton(kn, vn, kc, vc, slots),
                                       "twin(eager)": lambda: K.store_kv_ref(kn, vn, kc, vc, slots)},
             4 * kn.numel() * es, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="fused vs naive log-prob peak memory")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--with-triton", action="store_true", help="--memory: also the Triton path "
                    "(under the interpreter on CPU: slow)")
    ap.add_argument("--memory-child", nargs=5, metavar=("VARIANT", "N", "V", "H", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.memory_child:
        v, *nums = a.memory_child
        print(json.dumps(memory_child(v, *map(int, nums))))
        return 0
    if a.memory:
        variants = ("naive", "twin", "triton") if a.with_triton else ("naive", "twin")
        res = measure_memory(a.n, a.v, a.h, a.chunk, variants)
        naive = res["naive"]["peak_delta_mib"]
        print(f"linear log-probs forward+backward, N={a.n} V={a.v} H={a.h} chunk={a.chunk}, fp32, peak RSS "
              f"growth over the inputs (fresh process each):")
        for v, r in res.items():
            print(f"  {v:7s} {r['peak_delta_mib']:9.1f} MiB  ({100 * r['peak_delta_mib'] / naive:5.1f}% of naive)"
                  f"  sum logp {r['logp_sum']:.6g}")
        return 0
    if torch.cuda.is_available():
        cuda_benchmarks()
        return 0
    if os.environ.get("TRITON_INTERPRET") != "1":   # triton reads it at import: restart with it set
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  dict(os.environ, TRITON_INTERPRET="1"))
    print("No CUDA device: kernel timings need a GPU (H100 ceilings: benchmarks/README.md).")
    print("Interpreter correctness pass (TRITON_INTERPRET=1, CPU):")
    return 0 if interpreter_pass() else 1


if __name__ == "__main__":
    sys.exit(main())
