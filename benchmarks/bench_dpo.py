"""One DPO step on CPU: our fused one-pass loss vs our naive loss vs TRL's DPOTrainer; and our SFT tokens/s.

Same weights (one random ~56M Llama checkpoint: hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate
1408, vocab 32000, untied) and same data (4 pairs per step, prompt --prompt + responses --resp tokens each,
random ids) for every variant. Each variant runs in its own fresh process (so peak memory is its own):

    ours_cache   train/dpo.py's defaults: fused one-pass loss, the prompt computed once per pair
                 (share_prompt), selective activation checkpointing, reference log-probs precomputed (no
                 reference model in memory during training)
    ours_unshared  ours_cache without share_prompt (each response with its own copy of the prompt)
    ours_plain   ours_unshared without selective checkpointing (the trainer's default before issue 20)
    cli          `python train/dpo.py` itself in a default environment, as a user runs it (its whole-process
                 peak RSS from wait4; step wall times from its metrics.jsonl)
    ours_online  fused one-pass loss, frozen reference model scored in a no-grad pass over the same batch
    naive        our model, full [B, T, V] logits, chosen and rejected in separate passes, policy and
                 reference (losses.naive_sequence_logps)
    trl          trl.DPOTrainer (defaults: online reference model), in its own venv
    trl_precompute  trl.DPOTrainer with precompute_ref_log_probs=True
    sft          our SFT step on the same 4 x 512 tokens (packed rows), for tokens/s
    ours_cache_ac  ours_cache with activation checkpointing (not in the default run)

A step is forward + backward + grad clipping + AdamW. Reported: median step CPU time (process time, all
threads) and wall time over --steps after --warmup steps, and two memory figures: the whole process's
peak RSS (VmHWM of the whole run, setup included: what a user's `/usr/bin/time -v` shows) and the training
peak (VmHWM reset after setup, the figure this script reported before issue 20). The environment is the
default one (threads as torch sets them, no allocator settings) unless --threads N pins threads or
--pin-mmap sets glibc's mmap threshold (the earlier measurement).

    python benchmarks/bench_dpo.py                   # all variants, table on stdout, JSON in .cache/bench_dpo/
    python benchmarks/bench_dpo.py --variants ours_cache ours_unshared trl --prompt 512 --resp 128

TRL is installed (`pip install trl`) into .cache/trl_venv, created with --system-site-packages so it uses
this environment's torch and transformers unchanged.
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
CACHE = ROOT / ".cache" / "bench_dpo"
VENV = ROOT / ".cache" / "trl_venv"
VARIANTS = ("ours_cache", "ours_unshared", "ours_plain", "cli", "ours_online", "naive", "trl", "trl_precompute",
            "sft", "ours_cache_ac")
PAIRS, VOCAB = 4, 32000
PROMPT, RESP = 256, 256          # set from --prompt / --resp (children get the same flags)


def mem_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS


def make_checkpoint(path: Path) -> None:
    import torch
    import transformers as tf
    if (path / "config.json").exists():
        return
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)


def make_pairs(steps: int) -> list[tuple[list[int], list[int], list[int]]]:
    import random
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]
    return [([1] + ids(PROMPT - 1), ids(RESP - 1) + [2], ids(RESP - 1) + [2]) for _ in range(PAIRS * steps)]


def make_cli_inputs(d: Path, steps: int) -> tuple[Path, Path]:
    """The checkpoint plus a word-level tokenizer (word i = token i) as a user's folder, and pairs.jsonl
    carrying the same ids (prompt_token_ids etc.)."""
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = d / "cli_model"
    if not (model / "tokenizer.json").exists():
        shutil.copytree(CACHE / "model", model, dirs_exist_ok=True)
        wl = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(VOCAB)}, unk_token="<0>"))
        wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        wl.save(str(model / "tokenizer.json"))
        (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<1>", "eos_token": "<2>",
                                                                 "pad_token": "<0>"}))
    data = d / f"pairs_{PROMPT}_{RESP}_{steps}.jsonl"
    with open(data, "w") as f:   # responses without their EOS: the trainer appends the end-of-turn token
        for p, c, r in make_pairs(steps):
            f.write(json.dumps({"prompt": "-", "chosen": "-", "rejected": "-", "prompt_token_ids": p,
                                "chosen_token_ids": c[:-1], "rejected_token_ids": r[:-1]}) + "\n")
    return model, data


def run_cli(steps: int, warmup: int, threads: int, env: dict) -> dict:
    """train/dpo.py as a user runs it; its peak RSS as the kernel accounts it at exit (wait4)."""
    n = steps + warmup
    model, data = make_cli_inputs(CACHE, n)
    out = CACHE / "cli_out"
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train" / "dpo.py"), "--model", str(model), "--data", str(data),
           "--output", str(out), "--batch-size", str(PAIRS), "--max-steps", str(n), "--no-shuffle",
           "--max-length", str(PROMPT + RESP), "--max-prompt-length", str(PROMPT), "--warmup-steps", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        return {"error": f"exit status {status}"}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    el = [0.0] + [r["elapsed_s"] for r in recs]
    times = [b - a for a, b in zip(el, el[1:])]
    return {"step_times": times[warmup:], "cpu_times": [float("nan")] * steps, "rss_base_mb": float("nan"),
            "peak_mb": float("nan"), "process_peak_mb": ru.ru_maxrss / 1024, "tokens_per_step": 0,
            "process_wall_s": wall, "median_s": statistics.median(times[warmup:]), "median_cpu_s": float("nan")}


# ---- our variants ------------------------------------------------------------------------------------
def run_ours(variant: str, model_dir: Path, steps: int, warmup: int) -> dict:
    import torch
    from selfreward.model.checkpoint import load_model
    from selfreward.train.data import Example, Pair, pack_rows, pair_batch
    from selfreward.train.losses import (DPOLossConfig, compute_reference, dpo_loss, naive_sequence_logps, sequence_logps,
                              sft_logp_sum)
    n = steps + warmup
    pairs = [Pair(*p) for p in make_pairs(n)]
    policy = load_model(model_dir).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    cfg = DPOLossConfig("sigmoid", beta=0.1)
    ref_model, table = None, None
    if variant in ("ours_online", "naive"):
        ref_model = load_model(model_dir).eval().requires_grad_(False)
    share = variant in ("ours_cache", "ours_online", "ours_cache_ac")
    if variant in ("ours_cache", "ours_unshared", "ours_plain", "ours_cache_ac"):
        table = compute_reference(policy, pairs, list(range(len(pairs))), PAIRS, share)   # before any update
    from selfreward.train.parallel import apply_activation_checkpointing, apply_selective_checkpointing
    if variant.endswith("_ac"):
        apply_activation_checkpointing(policy)
    elif variant in ("ours_cache", "ours_unshared", "ours_online", "sft"):
        apply_selective_checkpointing(policy)
    policy.train()
    times, cpu = [], []
    setup_peak = mem_kb("VmHWM")
    reset_peak()
    base = mem_kb("VmRSS")
    tokens = 0
    for s in range(n):
        batch = pairs[s * PAIRS:(s + 1) * PAIRS]
        t0, c0 = time.perf_counter(), time.process_time()
        if variant == "sft":
            rows = pack_rows([Example(p.prompt + p.chosen, [False] * len(p.prompt) + [True] * len(p.chosen))
                              for p in batch], PROMPT + RESP, 0, packing=True)
            lp, ntgt = sft_logp_sum(policy, rows)
            loss = -lp / ntgt
            tokens = rows["input_ids"].numel()
        else:
            b = pair_batch(batch, share)
            if variant == "naive":
                pol = naive_sequence_logps(policy, batch)
                with torch.no_grad():
                    ref = naive_sequence_logps(ref_model, batch)
            else:
                pol = sequence_logps(policy, b)
                if table is not None:
                    t = table[s * PAIRS:(s + 1) * PAIRS]
                    ref = torch.cat([t[:, 0], t[:, 1]])
                else:
                    with torch.no_grad():
                        ref = sequence_logps(ref_model, b)
            loss = dpo_loss(pol, ref, b.resp_len, cfg)[0].mean()
            tokens = int(b.tokens.numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"  {variant} step {s + 1}/{n}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU, loss {loss.item():.5f}",
              file=sys.stderr, flush=True)
    return {"step_times": times[warmup:], "cpu_times": cpu[warmup:], "rss_base_mb": base / 1024,
            "peak_mb": mem_kb("VmHWM") / 1024, "process_peak_mb": max(setup_peak, mem_kb("VmHWM")) / 1024,
            "tokens_per_step": tokens}


# ---- TRL ---------------------------------------------------------------------------------------------------
def run_trl(variant: str, model_dir: Path, steps: int, warmup: int) -> dict:
    """TRL tokenizes text, so the random ids are written as words of a word-level tokenizer whose word i is
    token i: TRL sees exactly our ids."""
    import torch
    import transformers as tf
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer
    n = steps + warmup
    # words "<i>": a special token's text ("<2>") is never a substring of another word ("<27>")
    vocab = {f"<{i}>": i for i in range(VOCAB)}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<1>", eos_token="<2>", pad_token="<0>")
    text = lambda ids: " ".join(f"<{i}>" for i in ids)
    rows = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)} for p, c, r in make_pairs(n)]
    assert tok(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"] == make_pairs(1)[0][0] + make_pairs(1)[0][1]
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(CACHE / "trl_out"), per_device_train_batch_size=PAIRS, max_steps=n,
                     learning_rate=1e-6, beta=0.1, max_length=PROMPT + RESP, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                     precompute_ref_log_probs=variant == "trl_precompute", optim="adamw_torch")
    times, cpu, marks = [], [], {}

    class Timer(tf.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["setup_peak"] = mem_kb("VmHWM")
            reset_peak()
            marks["base"] = mem_kb("VmRSS")

        def on_step_begin(self, *a, **k):
            marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - marks["t0"])
            cpu.append(time.process_time() - marks["c0"])
            print(f"  {variant} step {len(times)}/{n}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU",
                  file=sys.stderr, flush=True)

    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Timer()])
    trainer.train()
    return {"step_times": times[warmup:], "cpu_times": cpu[warmup:], "rss_base_mb": marks["base"] / 1024,
            "peak_mb": mem_kb("VmHWM") / 1024, "process_peak_mb": max(marks["setup_peak"], mem_kb("VmHWM")) / 1024,
            "tokens_per_step": 2 * PAIRS * (PROMPT + RESP)}


def child(variant: str, steps: int, warmup: int, threads: int, out: Path) -> None:
    import torch
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    model_dir = CACHE / "model"
    fn = run_trl if variant.startswith("trl") else run_ours
    res = fn(variant, model_dir, steps, warmup)
    res.update(variant=variant, threads=threads, median_s=statistics.median(res["step_times"]),
               median_cpu_s=statistics.median(res["cpu_times"]))
    out.write_text(json.dumps(res))


def ensure_trl_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import trl"], capture_output=True).returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "trl"], check=True)
    return py


def main() -> None:
    global PROMPT, RESP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[:-1]), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair")
    ap.add_argument("--resp", type=int, default=256, help="tokens per response")
    ap.add_argument("--threads", type=int, default=0, help="pin torch threads in every variant (0: the default)")
    ap.add_argument("--pin-mmap", action="store_true",
                    help="MALLOC_MMAP_THRESHOLD_=65536 as the earlier measurement (not what a user runs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    PROMPT, RESP = a.prompt, a.resp
    if a.child:
        return child(a.child, a.steps, a.warmup, a.threads, Path(a.out))
    CACHE.mkdir(parents=True, exist_ok=True)
    make_checkpoint(CACHE / "model")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if a.pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = {}
    load0 = os.getloadavg()
    for v in a.variants:
        print(f"[bench_dpo] {v} (load average {os.getloadavg()[0]:.1f})", flush=True)
        if v == "cli":
            results[v] = run_cli(a.steps, a.warmup, a.threads, env)
            continue
        py = str(ensure_trl_venv()) if v.startswith("trl") else sys.executable
        out = CACHE / f"{v}.json"
        out.unlink(missing_ok=True)
        cmd = [py, __file__, "--child", v, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--threads", str(a.threads), "--prompt", str(PROMPT), "--resp", str(RESP), "--out", str(out)]
        r = subprocess.run(cmd, env=env, cwd=ROOT)
        if r.returncode != 0 or not out.exists():
            results[v] = {"error": f"exit code {r.returncode}"}
            continue
        results[v] = json.loads(out.read_text())
    load1 = os.getloadavg()
    name = f"results_{PROMPT}_{RESP}.json"
    (CACHE / name).write_text(json.dumps({"results": results, "load_before": load0, "load_after": load1,
                                          "threads": a.threads, "pin_mmap": a.pin_mmap,
                                          "prompt": PROMPT, "resp": RESP}, indent=1))
    trl = results.get("trl", {})
    print(f"\nprompt {PROMPT} + responses {RESP} x 2, {PAIRS} pairs/step; threads "
          f"{a.threads or 'default (' + str(results.get('ours_cache', {}).get('threads', '?')) + ')'}; "
          f"mmap threshold {'pinned' if a.pin_mmap else 'default'}; load average (1/5/15 min) before {load0}, "
          f"after {load1}; JSON in {CACHE / name}")
    print("| variant | median step wall s | median step CPU s | whole-process peak RSS MB | training peak MB "
          "(reset after setup) | wall speed vs trl | CPU speed vs trl | whole peak vs trl |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda x, fmt: "-" if x != x else format(x, fmt)     # NaN -> "-"
    for v, r in results.items():
        if "error" in r:
            print(f"| {v} | {r['error']} | | | | | | |")
            continue
        sp_w = f"{trl['median_s'] / r['median_s']:.2f}x" if "median_s" in trl else "-"
        sp_c = f"{trl['median_cpu_s'] / r['median_cpu_s']:.2f}x" if "median_cpu_s" in trl and \
            r["median_cpu_s"] == r["median_cpu_s"] else "-"
        rel_m = f"{r['process_peak_mb'] / trl['process_peak_mb']:.2f}x" if "process_peak_mb" in trl else "-"
        print(f"| {v} | {r['median_s']:.1f} | {f(r['median_cpu_s'], '.1f')} | {r['process_peak_mb']:.0f} | "
              f"{f(r['peak_mb'], '.0f')} | {sp_w} | {sp_c} | {rel_m} |")


if __name__ == "__main__":
    main()
