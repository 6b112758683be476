"""Where one training step's time and memory go: ours (train/sft.py's / train/dpo.py's task, default settings) or
TRL 1.16's SFTTrainer / DPOTrainer (bench_real.py's settings), in-process, on a Hugging Face model folder and
bench_real.py's data (issue 30; the findings: benchmarks/README.md, "SmolLM2 shape (issue 30)").

Step 1 is a warm-up (it also allocates AdamW's state); step 2 runs under torch.profiler. Reported:
- time: the step's phases (forward = the loss, backward, optimizer, the rest) and its self CPU time by kind of
  op: the LM head (a matmul with a vocabulary-sized dimension, and the element-wise work on [rows, V] blocks),
  the other matmuls (the blocks' linears; with their input shapes), attention (SDPA and the 4-D [S, H, L, D]
  copies around it), the optimizer's kernels, and the rest by op name;
- memory: RSS after loading, after step 1 (gradients and optimizer state), the step 2 peak (VmHWM reset first),
  and the RSS growth over step 2's forward (what it keeps for backward: the activations).

    python benchmarks/profile_real.py --model /tmp/smollm2-hf --trainer dpo --who ours
    .cache/trl_venv/bin/python benchmarks/profile_real.py --model /tmp/smollm2-hf --trainer sft --who trl

--data: bench_real.py's .cache/bench_real/{sft,dpo}_24.jsonl unless given. JSON: .cache/profile_real/.
"""
import argparse
import contextlib
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "profile_real"


def kb(field: str) -> int:
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))


class Growth:
    """RSS growth over a block (GB): what the forward keeps for backward (activations), as the process sees it
    (saved_tensors_hooks would miss what torch.utils.checkpoint saves through its own hooks)."""
    gb = 0.0

    def __enter__(self):
        self.rss = kb("VmRSS")

    def __exit__(self, *exc):
        self.gb = (kb("VmRSS") - self.rss) / 2**20


def kind(name: str, shapes: list, vocab: int) -> str:
    dims = [d for s in shapes if isinstance(s, list) for d in s]
    if vocab in dims:
        return "LM head matmul" if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::addmm_") else \
            "LM head element-wise"
    if "attention" in name:
        return "attention (SDPA)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "other matmuls"
    if any(isinstance(s, list) and len(s) == 4 for s in shapes):
        return "attention copies (4-D)"
    if "adam" in name.lower() or "foreach" in name:
        return "optimizer kernels"
    return name


def report(prof, vocab: int, mem: dict, out: Path) -> None:
    phases = defaultdict(float)
    for e in prof.events():
        if e.name in ("forward", "backward", "optimizer", "clip") or e.name.startswith("Optimizer.step#"):
            phases["optimizer" if e.name.startswith("Optimizer.step#") else e.name] += e.cpu_time_total / 1e6
    step = max(e.time_range.end for e in prof.events()) / 1e6 - min(e.time_range.start
                                                                        for e in prof.events()) / 1e6
    kinds, mms = defaultdict(float), defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        k = kind(e.key, e.input_shapes, vocab)
        kinds[k] += e.self_cpu_time_total / 1e6
        if k == "other matmuls":
            mms[f"{e.key} {e.input_shapes}"] += e.self_cpu_time_total / 1e6
    top = sorted(kinds.items(), key=lambda x: -x[1])[:18]
    print(f"step {step:.2f} s (profiled); phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print("self CPU time by kind:")
    for k, v in top:
        print(f"  {v:7.2f} s  {100 * v / step:5.1f}%  {k}")
    print("largest other matmuls:")
    for k, v in sorted(mms.items(), key=lambda x: -x[1])[:8]:
        print(f"  {v:7.2f} s  {k}")
    print("memory: " + ", ".join(f"{k} {v:.2f} GB" for k, v in mem.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"step_s": step, "phases": phases, "kinds": dict(top), "memory_gb": mem,
                               "matmuls": dict(sorted(mms.items(), key=lambda x: -x[1])[:20])}, indent=1))
    out.with_suffix(".txt").write_text(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=40, max_shapes_column_width=90))
    print(f"JSON: {out}; the op table: {out.with_suffix('.txt')}")


def ours(a) -> None:
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.train.data import global_batch
    from selfreward.train.parallel import Dist
    if a.trainer == "sft":
        from selfreward.train.sft import SFTConfig as Config, SFTTask as Task
    else:
        from selfreward.train.dpo import DPOConfig as Config, DPOTask as Task
    kw = {"ref_cache_dir": str(OUT / "ref_cache")} if a.trainer == "dpo" else {}    # the reference pass once
    cfg = Config(model=a.model, data=[a.data], output=tempfile.mkdtemp(), batch_size=a.batch,
                 max_length=a.max_length, shuffle=False, **kw)
    d = Dist()
    task = Task(cfg, d, Tokenizer.load(a.model))
    model = task.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)       # as train/loop.py in one process
    mem = {"after load": kb("VmRSS") / 2**20}
    saved = Growth()
    for step in range(2):
        batch = global_batch(len(task.train), a.batch, step, 0, False)
        if step == 1:
            mem["after step 1"] = kb("VmRSS") / 2**20
            Path("/proc/self/clear_refs").write_text("5")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) if step else contextlib.nullcontext() \
                as prof:
            with record_function("forward"), (saved if step else contextlib.nullcontext()):
                loss_sum, st = task.micro(model, batch)
            with record_function("backward"):
                (loss_sum / task.norm(batch)).backward()
            with record_function("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            with record_function("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {float(loss_sum.detach()) / task.norm(batch):.4f}, tokens {int(st['tokens'])}")
    mem.update({"step 2 peak": kb("VmHWM") / 2**20, "RSS growth over the forward": saved.gb})
    report(prof, model.cfg.vocab_size, mem, OUT / f"ours_{a.trainer}_{Path(a.model).name}.json")


def trl(a) -> None:
    import transformers as tf
    sys.argv = [sys.argv[0]]
    from bench_real import trl_child
    marks, saved = {}, Growth()

    class Prof(tf.TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            if state.global_step == 0:
                marks["after load"] = kb("VmRSS") / 2**20
            if state.global_step == 1:
                marks["after step 1"] = kb("VmRSS") / 2**20
                Path("/proc/self/clear_refs").write_text("5")
                marks["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                marks["prof"].__enter__()

        def on_step_end(self, args, state, control, **k):
            if state.global_step == 2:
                marks["prof"].__exit__(None, None, None)
                marks["step 2 peak"] = kb("VmHWM") / 2**20

    def setup(trainer):
        trainer.add_callback(Prof())
        fwd, bwd = trainer.compute_loss, trainer.accelerator.backward

        def compute_loss(*args, **kw):
            with record_function("forward"), (saved if "prof" in marks else contextlib.nullcontext()):
                return fwd(*args, **kw)

        def backward(*args, **kw):
            with record_function("backward"):
                return bwd(*args, **kw)
        trainer.compute_loss, trainer.accelerator.backward = compute_loss, backward
    trl_child(a.trainer, a.model, a.data, 2, a.batch, a.max_length, False, setup)
    mem = {k: marks[k] for k in ("after load", "after step 1", "step 2 peak")}
    mem["RSS growth over the forward"] = saved.gb
    report(marks["prof"], tf.AutoConfig.from_pretrained(a.model).vocab_size, mem,
           OUT / f"trl_{a.trainer}_{Path(a.model).name}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--trainer", choices=["sft", "dpo"], required=True)
    ap.add_argument("--who", choices=["ours", "trl"], required=True)
    ap.add_argument("--data", default=None, help="JSONL as bench_real.py writes it")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.data = a.data or str(ROOT / ".cache" / "bench_real" / f"{a.trainer}_24.jsonl")
    torch.set_num_threads(a.threads)
    (ours if a.who == "ours" else trl)(a)


if __name__ == "__main__":
    main()
