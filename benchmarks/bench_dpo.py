"""One DPO step on CPU: our fused one-pass loss vs our naive loss vs TRL's DPOTrainer; and our SFT tokens/s.

Same weights (one random ~56M Llama checkpoint: hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate
1408, vocab 32000, untied) and same data (4 pairs per step, prompt --prompt + responses --resp tokens each,
random ids) for every variant. Each variant runs in its own fresh process (so peak memory is its own):

    ours_cache   train/dpo.py's defaults: fused one-pass loss, the prompt computed once per pair
                 (share_prompt), selective activation checkpointing, reference log-probs precomputed (no
                 reference model in memory during training)
    ours_cache_unfused  ours_cache with the LM head's backward recomputing the logits (kernels/logprobs.py) and
                 the per-op AdamW: the defaults before the fused head (train/dpo_head.py) and fused AdamW
    ours_unshared  ours_cache without share_prompt (each response with its own copy of the prompt)
    ours_plain   ours_unshared without selective checkpointing (the trainer's default before issue 20)
    cli          `python train/dpo.py` itself in a default environment, as a user runs it (its whole-process
                 peak RSS from wait4; step wall times from its metrics.jsonl)
    ours_online  fused one-pass loss, frozen reference model scored in a no-grad pass over the same batch
    naive        our model, full [B, T, V] logits, chosen and rejected in separate passes, policy and
                 reference (tests/test_train_losses.naive_sequence_logps)
    trl          trl.DPOTrainer (defaults: online reference model), in its own venv
    trl_precompute  trl.DPOTrainer with precompute_ref_log_probs=True
    sft          our SFT step on the same 4 x 512 tokens (packed rows), for tokens/s
    ours_cache_ac  ours_cache with activation checkpointing (not in the default run)

A step is forward + backward + grad clipping + AdamW. Reported: median step CPU time (process time, all
threads) and wall time over --steps after --warmup steps, and two memory figures: the whole process's
peak RSS (VmHWM of the whole run, setup included: what a user's `/usr/bin/time -v` shows) and the training
peak (VmHWM reset after setup, the figure this script reported before issue 20). The environment is the
default one (threads as torch sets them, no allocator settings) unless --threads N pins threads or
--pin-mmap sets glibc's mmap threshold (the earlier measurement). --rounds R runs the variants R times in
turn (fresh processes; medians over every measured step of every round), so that a change in the shared
machine's load falls on every variant alike.

The cached reference (ours_cache and the other cache variants, `train/dpo.py`'s default) is one no-grad pass
over every pair before training, outside the steps; TRL's default scores the reference inside each step. So
the table also gives "step + reference": the step plus that pass's time divided by the steps it covers (one
epoch: every pair is scored once), what a user pays per step of a one-epoch run (less over more epochs).
The cli variant reads the pass's time from train/dpo.py's own message.

    python benchmarks/bench_dpo.py                   # all variants, table on stdout, JSON in .cache/bench_dpo/
    python benchmarks/bench_dpo.py --variants ours_cache ours_unshared trl --prompt 512 --resp 128

TRL 1.16.0 is installed (`pip install trl==1.16.0`) into .cache/trl_venv, created with --system-site-packages so it uses
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
VARIANTS = ("ours_cache", "ours_cache_unfused", "ours_unshared", "ours_plain", "cli", "ours_online", "naive", "trl", "trl_precompute",
            "sft", "ours_cache_ac")
PAIRS, VOCAB = 4, 32000
FUSED_HEAD = ("ours_cache", "ours_unshared", "ours_online", "ours_cache_ac")   # train/dpo_head.py + fused AdamW
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
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:            # echoed as it comes; the reference pass's time is read from it
        print(line, end="", flush=True)
        lines.append(line)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        return {"error": f"exit status {status}"}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    el = [0.0] + [r["elapsed_s"] for r in recs]
    times = [b - a for a, b in zip(el, el[1:])]
    import re
    ref = [float(m.group(1)) for x in lines if (m := re.search(r"reference log-probs of .* \((\d+\.\d+) s\)", x))]
    if len(ref) != 1:
        return {"error": "train/dpo.py did not print its reference pass time"}
    return {"step_times": times[warmup:], "cpu_times": [r["cpu_s"] for r in recs][warmup:], "rss_base_mb": float("nan"),
            "peak_mb": float("nan"), "process_peak_mb": ru.ru_maxrss / 1024, "tokens_per_step": 0,
            "process_wall_s": wall, "process_cpu_s": ru.ru_utime + ru.ru_stime, "ref_s": ref[0], "ref_steps": n}


# ---- our variants ------------------------------------------------------------------------------------
def run_ours(variant: str, model_dir: Path, steps: int, warmup: int) -> dict:
    import torch
    from selfreward.model.checkpoint import load_model
    from selfreward.train.data import Example, Pair, pack_rows, pair_batch
    from selfreward.train.losses import DPOLossConfig, compute_reference, dpo_loss, sequence_logps, sft_logp_sum
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_losses import naive_sequence_logps
    n = steps + warmup
    pairs = [Pair(*p) for p in make_pairs(n)]
    from selfreward.train.dpo_head import pair_head_loss
    policy = load_model(model_dir).train()
    # as train/loop.py: fused AdamW (before issue 20's second half: the per-op loop)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, **({"fused": True} if variant in FUSED_HEAD + ("sft",)
                                                             else {"foreach": False}))
    cfg = DPOLossConfig("sigmoid", beta=0.1)
    ref_model, table = None, None
    if variant in ("ours_online", "naive"):
        ref_model = load_model(model_dir).eval().requires_grad_(False)
    share = variant in ("ours_cache", "ours_cache_unfused", "ours_online", "ours_cache_ac")
    ref_s, ref_cpu_s = float("nan"), float("nan")
    if variant in ("ours_cache", "ours_cache_unfused", "ours_unshared", "ours_plain", "ours_cache_ac"):
        t0, c0 = time.perf_counter(), time.process_time()
        table = compute_reference(policy, pairs, list(range(len(pairs))), PAIRS, share)   # before any update
        ref_s, ref_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    from selfreward.train.parallel import apply_checkpointing
    if variant.endswith("_ac"):
        apply_checkpointing(policy)
    elif variant in ("ours_cache", "ours_cache_unfused", "ours_unshared", "ours_online", "sft"):
        apply_checkpointing(policy, selective=True)
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
                if table is not None:
                    t = table[s * PAIRS:(s + 1) * PAIRS]
                    ref = torch.cat([t[:, 0], t[:, 1]])
                else:
                    with torch.no_grad():
                        ref = sequence_logps(ref_model, b)
                if variant in FUSED_HEAD:   # the trainer's path (train/dpo.py DPOTask.micro)
                    fn = lambda lp, sub: dpo_loss(lp, ref[sub], b.resp_len[sub], cfg)   # noqa: E731
                    loss = pair_head_loss(policy, b, fn)[0] / PAIRS
                else:
                    pol = sequence_logps(policy, b)
            if variant not in FUSED_HEAD and variant != "sft":
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
            "tokens_per_step": tokens, "ref_s": ref_s, "ref_cpu_s": ref_cpu_s, "ref_steps": n}


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
    """This interpreter where it has TRL 1.16 (`pip install -e '.[bench]'`), else .cache/trl_venv, made once."""
    try:
        import trl
        if trl.__version__ == "1.16.0":
            return Path(sys.executable)
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import trl"], capture_output=True).returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "trl==1.16.0"], check=True)
    return py


def main() -> None:
    global PROMPT, RESP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[:-1]), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, alternating")
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
    results: dict[str, dict] = {}
    load0 = os.getloadavg()
    for rnd in range(a.rounds):         # the variants alternate, so drift in the machine's load hits each alike
        for v in a.variants:
            print(f"[bench_dpo] round {rnd + 1}/{a.rounds}: {v} (load average {os.getloadavg()[0]:.1f})", flush=True)
            if v == "cli":
                r = run_cli(a.steps, a.warmup, a.threads, env)
            else:
                py = str(ensure_trl_venv()) if v.startswith("trl") else sys.executable
                out = CACHE / f"{v}.json"
                out.unlink(missing_ok=True)
                cmd = [py, __file__, "--child", v, "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--threads", str(a.threads), "--prompt", str(PROMPT), "--resp", str(RESP), "--out", str(out)]
                rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
                r = json.loads(out.read_text()) if rc == 0 and out.exists() else {"error": f"exit code {rc}"}
            if "error" in r or "error" in results.get(v, {}):
                results[v] = r if "error" in r else results[v]
                continue
            acc = results.setdefault(v, {"rounds": []})
            acc["rounds"].append(r)
    load1 = os.getloadavg()
    for v, acc in results.items():      # medians over every measured step of every round
        if "error" in acc:
            continue
        rs = acc["rounds"]
        nan = float("nan")
        med = lambda k: statistics.median([x for r in rs for x in r[k]]) if rs[0].get(k) else nan  # noqa: E731
        mid = lambda k: statistics.median([r[k] for r in rs]) if k in rs[0] else nan               # noqa: E731
        acc.update(median_s=med("step_times"), median_cpu_s=med("cpu_times"), process_peak_mb=max(
            r["process_peak_mb"] for r in rs), peak_mb=mid("peak_mb"), ref_s=mid("ref_s"),
            ref_steps=rs[0].get("ref_steps", 1), process_wall_s=mid("process_wall_s"))
        # the cached reference is one no-grad pass over every pair before training: a user pays it once per
        # pair, so per step of the first epoch it adds ref_s / steps (0 where the reference is in the step)
        ref_step = acc["ref_s"] / acc["ref_steps"] if acc["ref_s"] == acc["ref_s"] else 0.0
        acc["with_ref_s"] = acc["median_s"] + ref_step
    name = f"results_{PROMPT}_{RESP}.json"
    (CACHE / name).write_text(json.dumps({"results": results, "load_before": load0, "load_after": load1,
                                          "threads": a.threads, "pin_mmap": a.pin_mmap, "rounds": a.rounds,
                                          "prompt": PROMPT, "resp": RESP}, indent=1))
    trl = results.get("trl", {})
    print(f"\nprompt {PROMPT} + responses {RESP} x 2, {PAIRS} pairs/step; threads "
          f"{a.threads or 'default'}; mmap threshold {'pinned' if a.pin_mmap else 'default'}; {a.rounds} round(s) "
          f"of {a.steps} measured steps after {a.warmup} warm-up; load average (1/5/15 min) before {load0}, "
          f"after {load1}; JSON in {CACHE / name}")
    print("| variant | median step wall s | median step CPU s | reference pass per step (1 epoch) s | step + "
          "reference s | whole-process peak RSS MB | training peak MB (reset after setup) | wall speed vs trl | "
          "with reference vs trl | CPU speed vs trl | whole peak vs trl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x, fmt: "-" if x != x else format(x, fmt)     # NaN -> "-"  # noqa: E731
    ratio = lambda k, r: f"{trl[k] / r[k]:.2f}x" if k in trl and r[k] == r[k] else "-"  # noqa: E731
    for v, r in results.items():
        if "error" in r:
            print(f"| {v} | {r['error']} | | | | | | | | | |")
            continue
        rel_m = f"{r['process_peak_mb'] / trl['process_peak_mb']:.2f}x" if "process_peak_mb" in trl else "-"
        ref_step = r["with_ref_s"] - r["median_s"]
        print(f"| {v} | {r['median_s']:.2f} | {f(r['median_cpu_s'], '.2f')} | {ref_step:.2f} | "
              f"{r['with_ref_s']:.2f} | {r['process_peak_mb']:.0f} | {f(r['peak_mb'], '.0f')} | "
              f"{ratio('median_s', r)} | {ratio('with_ref_s', r)} | {ratio('median_cpu_s', r)} | {rel_m} |")
    for v, r in results.items():
        if "rounds" in r:
            print(f"  {v}: step wall s per round {[[round(x, 2) for x in q['step_times']] for q in r['rounds']]}; "
                  f"CPU s {[[round(x, 2) for x in q['cpu_times']] for q in r['rounds']]}")

if __name__ == "__main__":
    main()
