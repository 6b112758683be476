"""Compile every Triton kernel ahead of time for an H100 (sm_90) without a GPU, and report its resources.

    python tests/compile_kernels.py [--arch 90] [--dtype bf16 fp16] [--json]

Triton lowers each kernel through TTIR -> TTGIR -> LLVM -> PTX, and the bundled ptxas assembles the
cubin, all on the CPU. This proves the kernels (with the tile sizes, warps and stages the launchers pick on
CUDA, and the bf16 tl.dot the interpreter cannot test) are accepted by the real compiler and fit the SM:
shared memory per block <= 227 KiB, registers per thread <= 255 (read from the cubin with cuobjdump,
with the bytes spilled to local memory, which cost speed but not correctness).
It does not prove they compute the right numbers on a GPU or how fast they are: that needs a GPU run.
Must run without TRITON_INTERPRET (the interpreter replaces @jit kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # triton 3.9's default, stated (silences a warning)
SMEM_LIMIT = 227 * 1024         # H100: max dynamic shared memory per block
FLOAT_SCALARS = {"eps", "sm_scale"}
INT_SCALARS = {"H", "M", "N", "D"}
POINTER_TYPES = {  # non-activation pointers; everything else uppercase is an activation of --dtype
    "RSTD": "*fp32", "DWP": "*fp32", "COS": "*fp32", "SIN": "*fp32", "T": "*i64", "LSE": "*fp32",
    "LOGP": "*fp32", "G": "*fp32", "CU": "*i32", "DELTA": "*fp32", "SLOT": "*i64", "CUQ": "*i32",
    "BT": "*i32", "CTX": "*i32", "LSEP": "*fp32", "PRE": "*i32", "DEP": "*i32",
}


def _cases(dt: str):
    """(name, jit fn, constexprs, launch options, pointer overrides) as the CUDA launchers use them."""
    import triton
    import torch
    from selfreward.kernels import attention_triton as A, logprobs_triton as LP, paged_triton as P
    from selfreward.kernels import rmsnorm_triton as R, rope_triton as RO, swiglu_triton as S
    out = []
    for H in (4096, 8192):
        B = triton.next_power_of_2(H)
        out.append((f"rmsnorm_fwd H{H} +res", R._rmsnorm_fwd, dict(HAS_RES=True, BLOCK=B), dict(num_warps=R.num_warps(B)), {}))
        out.append((f"rmsnorm_bwd H{H} +res", R._rmsnorm_bwd, dict(HAS_DS=True, BLOCK=B), dict(num_warps=R.num_warps(B)), {}))
    out.append(("swiglu_fwd", S._swiglu_fwd, dict(BLOCK=S.BLOCK), dict(num_warps=4), {"G": f"*{dt}"}))
    out.append(("swiglu_bwd", S._swiglu_bwd, dict(BLOCK=S.BLOCK), dict(num_warps=4), {"G": f"*{dt}"}))
    out.append(("rope hd128 32 heads", RO._rope_kernel, dict(SIGN=1.0, BLOCK_H=32, BLOCK_D=64), dict(num_warps=4), {}))
    BV, nw = LP.block_v(128256, torch.device("cuda"))
    out.append(("logprobs lse_fwd V128k", LP._lse_fwd, dict(BLOCK_V=BV), dict(num_warps=nw), {"V": "i32"}))
    out.append(("logprobs dlogits_bwd", LP._dlogits_bwd, dict(BLOCK_V=BV), dict(num_warps=nw), {"V": "i32"}))
    for D in (64, 128):
        (fm, fn_, fw, fs), (bm, bn, bw, bs) = A.tile_config(True, D)
        for pre in (False, True):   # prefix segments (shared-prompt DPO) compile as their own variant
            c = dict(REP=4, D=D, BLOCK_D=D, PREC=None, HAS_PREFIX=pre)
            tag = " +prefix" if pre else ""
            out.append((f"attn_fwd hd{D}{tag}", A._attn_fwd, dict(c, BLOCK_M=fm, BLOCK_N=fn_),
                        dict(num_warps=fw, num_stages=fs), {}))
            out.append((f"attn_bwd_dkdv hd{D}{tag}", A._attn_bwd_dkdv, dict(c, BLOCK_M=bm, BLOCK_N=bn),
                        dict(num_warps=bw, num_stages=bs), {}))
            out.append((f"attn_bwd_dq hd{D}{tag}", A._attn_bwd_dq, dict(c, BLOCK_M=bm, BLOCK_N=bn),
                        dict(num_warps=bw, num_stages=bs), {}))
        c = dict(REP=4, D=D, BLOCK_D=D, PREC=None)
        for qlen, name in ((1, "decode"), (512, "prefill")):
            pm, pn, pw = P.tile_config(True, qlen, 4, D)
            out.append((f"paged_{name} hd{D}", P._paged_attn, dict(c, BLOCK_M=pm, BLOCK_N=pn, SPLIT=False),
                        dict(num_warps=pw), {}))
        pm, pn, pw = P.tile_config(True, 1, 4, D)
        out.append((f"paged_decode_splitk hd{D}", P._paged_attn, dict(c, BLOCK_M=pm, BLOCK_N=pn, SPLIT=True),
                    dict(num_warps=pw), {"O": "*fp32"}))
        out.append((f"store_kv hd{D}", P._store_kv, dict(BLOCK_H=8, BLOCK_D=D), dict(num_warps=4), {}))
    return out


def _signature(fn, constexprs: dict, dt: str, overrides: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name in INT_SCALARS:
            sig[name] = "i32"
        elif name in POINTER_TYPES:
            sig[name] = POINTER_TYPES[name]
        elif name.isupper():
            sig[name] = f"*{dt}"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes, tmp: Path) -> dict:
    """REG (per thread) and STACK / LOCAL bytes (register spills) from the cubin, via cuobjdump."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"regs": None, "spill_bytes": None}
    tmp.write_bytes(cubin)
    out = subprocess.run([str(tool), "--dump-resource-usage", str(tmp)], capture_output=True, text=True).stdout
    val = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", out)) else None  # noqa: E731
    return {"regs": val("REG"), "spill_bytes": (val("STACK") or 0) + (val("LOCAL") or 0)}


def compile_all(arch: int = 90, dtypes=("bf16", "fp16")) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_kernels.py must run without TRITON_INTERPRET=1")
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", arch, 32)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for dt in dtypes:
            for name, fn, constexprs, opts, over in _cases(dt):
                t0 = time.time()
                src = ASTSource(fn=fn, signature=_signature(fn, constexprs, dt, over), constexprs=constexprs)
                k = triton.compile(src, target=target, options=opts)
                rows.append({"kernel": name, "dtype": dt, "shared_bytes": k.metadata.shared,
                             **_resources(k.asm["cubin"], Path(d) / "k.cubin"), "num_warps": opts["num_warps"],
                             "num_stages": opts.get("num_stages", 3), "seconds": round(time.time() - t0, 2)})
                r = rows[-1]
                r["fits"] = r["shared_bytes"] <= SMEM_LIMIT and (r["regs"] is None or r["regs"] <= 255)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = compile_all(a.arch, tuple(a.dtype))
    if a.json:
        print(json.dumps(rows))
    else:
        print(f"Triton {__import__('triton').__version__}, target sm_{a.arch} (compiled on CPU, not run)")
        for r in rows:
            print(f"  {r['kernel']:24s} {r['dtype']:5s} smem {r['shared_bytes'] / 1024:7.1f} KiB  regs "
                  f"{r['regs']!s:>4}  spills {r['spill_bytes']!s:>4} B  warps {r['num_warps']}  stages {r['num_stages']}  "
                  f"{'ok' if r['fits'] else 'DOES NOT FIT'}  ({r['seconds']} s)")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
