"""The sections of benchmarks/gpu_check.py: each `name(out_dir, budget_s) -> {"rows": [...], "failed": bool}`.
CUDA only; untested (no GPU has run them yet)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import selfreward.kernels.ops as K

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}     # max |kernel - twin| / max(1, |twin|max), fwd and grads
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()


def _fwd_bwd(fn, inputs, seed: int = 0):
    ts = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    o = fn(*ts)
    g = torch.randn(o.shape, generator=torch.Generator(o.device).manual_seed(seed), device=o.device, dtype=o.dtype)
    o.backward(g)
    return [o.detach()] + [t.grad for t in ts if t.requires_grad]


def _cases(dtype, dev="cuda"):
    """(name, triton fn, twin fn, inputs) over odd shapes; the twins are the definitions (kernels/*.py)."""
    from selfreward.kernels.attention_triton import attention_triton
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)     # noqa: E731
    cos, sin = K.rope_cos_sin(torch.rand(40, device=dev), torch.arange(333, device=dev) % 97)
    lens = [5, 130, 1, 77]
    cu = torch.tensor([0, 5, 135, 136, 213], device=dev, dtype=torch.int32)
    # shared prompt: prompt 70 read by replies of 9 and 40; a plain sequence of 33
    pcu = torch.tensor([0, 70, 79, 119, 152], device=dev, dtype=torch.int32)
    pre = torch.tensor([[0, 0], [0, 70], [0, 70], [0, 0]], device=dev, dtype=torch.int32)
    w = (r(3001, 96) / 8)
    t = torch.randint(0, 3001, (257,), device=dev)
    t[::7] = -100
    from selfreward.kernels.logprobs_triton import linear_logprobs_triton
    return [
        ("rmsnorm", lambda x, g: K.rmsnorm(x, g, 1e-5), lambda x, g: K.rmsnorm_ref(x, g, 1e-5), [r(333, 1000), r(1000)]),
        ("swiglu", K.swiglu, K.swiglu_ref, [r(333, 1408), r(333, 1408)]),
        ("rope", lambda x: K.rope(x, cos.to(dtype), sin.to(dtype)),
         lambda x: K.rope_ref(x, cos.to(dtype), sin.to(dtype)), [r(333, 6, 80)]),
        ("attention", lambda q, k, v: attention_triton(q, k, v, cu, max(lens)),
         lambda q, k, v: K.attention_ref(q, k, v, cu, max(lens)), [r(213, 8, 64), r(213, 2, 64), r(213, 2, 64)]),
        ("attention+prefix", lambda q, k, v: attention_triton(q, k, v, pcu, 70, None, pre),
         lambda q, k, v: K.attention_ref(q, k, v, pcu, 70, None, pre), [r(152, 4, 128), r(152, 1, 128), r(152, 1, 128)]),
        ("logprobs", lambda h, w_: linear_logprobs_triton(h, w_, t, 64), lambda h, w_: K.linear_logprobs_ref(h, w_, t, 64),
         [r(257, 96), w]),
    ]


def _paged_cases(dtype, dev="cuda"):
    from selfreward.kernels.paged_triton import paged_decode_triton, paged_prefill_triton, store_kv_triton
    g = torch.Generator(dev).manual_seed(1)
    nb, bs, Hkv, Hq, D = 64, 16, 2, 8, 64
    kc = torch.randn(nb, bs, Hkv, D, device=dev, generator=g).to(dtype)
    vc = torch.randn(nb, bs, Hkv, D, device=dev, generator=g).to(dtype)
    bt = torch.randperm(nb, device=dev, generator=g).to(torch.int32).view(4, 16)
    cl = torch.tensor([1, 17, 200, 255], device=dev, dtype=torch.int32)
    qd = torch.randn(4, Hq, D, device=dev, generator=g).to(dtype)
    out = [("paged decode", _err(paged_decode_triton(qd, kc, vc, bt, cl), K.paged_decode_ref(qd, kc, vc, bt, cl)))]
    ql = torch.tensor([1, 5, 30, 2], device=dev)
    cuq = torch.zeros(5, dtype=torch.int32, device=dev)
    cuq[1:] = ql.cumsum(0)
    qp = torch.randn(int(ql.sum()), Hq, D, device=dev, generator=g).to(dtype)
    out.append(("paged prefill", _err(paged_prefill_triton(qp, kc, vc, cuq, bt, cl),
                                      K.paged_prefill_ref(qp, kc, vc, cuq, bt, cl))))
    kn, vn = (torch.randn(4, Hkv, D, device=dev, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([3, -1, 700, 1023], device=dev)
    a, b = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    store_kv_triton(kn, vn, *a, slots)
    K.store_kv_ref(kn, vn, *b, slots)
    out.append(("paged store", max(_err(a[0], b[0]), _err(a[1], b[1]))))
    return out


def kernels(out: Path, budget: float) -> dict:
    rows, failed = [["kernel", "dtype", "max rel err (fwd, grads)", "tolerance", "pass"], ["---"] * 5], False
    for dtype in (torch.float32, torch.bfloat16):
        for name, tri, twin, inputs in _cases(dtype):
            errs = [_err(a, b) for a, b in zip(_fwd_bwd(tri, inputs), _fwd_bwd(twin, inputs))]
            ok = max(errs) <= TOL[dtype]
            failed |= not ok
            rows.append([name, str(dtype)[6:], ", ".join(f"{e:.2e}" for e in errs), TOL[dtype], ok])
        for name, e in _paged_cases(dtype):
            ok = e <= TOL[dtype]
            failed |= not ok
            rows.append([name, str(dtype)[6:], f"{e:.2e}", TOL[dtype], ok])
    return {"rows": rows, "failed": failed}


def timings(out: Path, budget: float) -> dict:
    import bench_kernels
    bench_kernels.cuda_benchmarks(torch.bfloat16)     # prints the table: kept in the section's text
    return {}


def _llama_1b(path: Path) -> Path:
    import transformers as tf
    if not (path / "config.json").exists():
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _timed(f) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def sampler(out: Path, budget: float) -> dict:
    import transformers as tf
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.infer.sequence import SamplingParams
    path = _llama_1b(out / "llama_1b")
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    rows = [["workload", "ours tok/s", "ours, CUDA graphs tok/s", "graphs: same ids", "HF tok/s", "ours / HF"],
            ["---"] * 6]
    g = torch.Generator().manual_seed(0)
    t_end = time.perf_counter() + budget - 30
    for B in (1, 8, 64):
        if time.perf_counter() > t_end:
            break
        prompts = [torch.randint(3, 32000, (128,), generator=g).tolist() for _ in range(B)]
        eng = load_engine(path, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=256))
        sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))   # warm-up
        ours = _timed(lambda: eng.generate(prompts, sp))
        eager = [r[0].token_ids for r in eng.generate(prompts, sp)]
        del eng
        eng = load_engine(path, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=64, cuda_graphs=True))
        eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))   # warm-up
        graphs = _timed(lambda: eng.generate(prompts, sp))
        same = [r[0].token_ids for r in eng.generate(prompts, sp)] == eager
        ids = torch.tensor(prompts, device="cuda")
        hf.generate(ids[:1], max_new_tokens=4, do_sample=False)
        theirs = _timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128,
                                            min_new_tokens=128, do_sample=False))
        n = B * 128
        rows.append([f"greedy batch {B}, 128 + 128", f"{n / ours:.0f}", f"{n / graphs:.0f}", str(same),
                     f"{n / theirs:.0f}", f"{theirs / ours:.2f}x"])
        del eng
        torch.cuda.empty_cache()
    return {"rows": rows}


def _init_one_gpu_group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from selfreward.train.parallel import Dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    return Dist(0, 1, torch.device("cuda", 0), init_device_mesh("cuda", (1,)))


def train(out: Path, budget: float) -> dict:
    """One DPO step (8 pairs, prompt 512 + 2 x 256, shared prompt, selective checkpointing) and one SFT step
    (8 x 2048 packed) of the ~1B model under FSDP2 (bf16 params, fp32 reduction) on one GPU."""
    from selfreward.model.checkpoint import load_model
    from selfreward.train.data import Example, Pair, pack_rows, pair_batch
    from selfreward.train.losses import DPOLossConfig, dpo_loss, sequence_logps, sft_logp_sum
    from selfreward.train.parallel import parallelize
    d = _init_one_gpu_group()
    path = _llama_1b(out / "llama_1b")
    g = torch.Generator().manual_seed(0)
    r = lambda n: torch.randint(3, 32000, (n,), generator=g).tolist()    # noqa: E731
    rows = [["step", "tokens computed", "median s", "tokens/s", "MFU"], ["---"] * 5]
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0) * 1e12
    for kind in ("dpo", "sft"):
        model = load_model(path, dtype=torch.float32, device="cuda").train()
        n_params = sum(p.numel() for p in model.parameters())
        parallelize(model, d, False, True, selective=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            if kind == "dpo":
                pairs = [Pair([1] + r(511), r(255) + [2], r(255) + [2]) for _ in range(8)]
                b = pair_batch(pairs)
                lp = sequence_logps(model, b)
                ref = lp.detach() - 1.0
                loss = dpo_loss(lp, ref, b.resp_len.cuda(), DPOLossConfig())[0].mean()
                ntok = b.tokens.numel()
            else:
                exs = [Example([1] + r(2047), [False] * 1024 + [True] * 1024) for _ in range(8)]
                rows_ = pack_rows(exs, 2048, 0, packing=True)
                lp, nt = sft_logp_sum(model, rows_)
                loss = -lp / nt
                ntok = rows_["input_ids"].numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = sorted(times[1:])[len(times[1:]) // 2]
        # 6 N per token (forward + backward) + the selective recompute, not counted: MFU is of useful FLOPs
        mfu = 6 * n_params * ntok / s / peak
        rows.append([kind, ntok, f"{s:.3f}", f"{ntok / s:.0f}", f"{mfu:.1%}"])
        del model, opt
        torch.cuda.empty_cache()
    return {"rows": rows, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def smoke(out: Path, budget: float) -> dict:
    """The world's smoke loop with the engine on CUDA; every forward of the model records its device under
    the stage (module) that called it: a stage that ran on the CPU fails the check."""
    import inspect
    from selfreward.model.llama import Transformer
    from selfreward.recipes.world import demo
    seen: dict[str, set] = {}
    stages = ("selfreward.train.sft", "selfreward.train.dpo", "selfreward.infer.engine", "selfreward.recipes.judge",
              "selfreward.recipes.world.build")
    orig = Transformer.forward

    def forward(self, tokens, positions, ctx):
        mods = [f.frame.f_globals.get("__name__", "") for f in inspect.stack(0)[1:30]]
        stage = next((m for m in mods if m in stages), mods[0] if mods else "?")
        seen.setdefault(stage, set()).add(str(tokens.device.type))
        return orig(self, tokens, positions, ctx)

    Transformer.forward = forward
    try:
        demo.main(["--smoke", "--run-dir", str(out / "smoke"), "--cache-dir", str(out / "smoke_cache"),
                   "--engine-device", "cuda"])
    finally:
        Transformer.forward = orig
    rows = [["stage (module calling the model)", "devices", "on GPU"], ["---"] * 3]
    failed = False
    for st, devs in sorted(seen.items()):
        ok = devs == {"cuda"}
        failed |= not ok
        rows.append([st, ", ".join(sorted(devs)), ok])
    return {"rows": rows, "failed": failed}
