"""train/sft.py and train/dpo.py against TRL 1.16's SFTTrainer and DPOTrainer on a real Hugging Face model
(issue 30: SmolLM2-135M-Instruct) with OASST text, as whole processes.

Each trainer runs twice per round, for --steps N and M optimizer steps (default 2 and 6), each in a fresh
process; (wall(M) - wall(N)) / (M - N) is the time per step with start-up (imports, loading, tokenizing,
our cached reference pass, the final save) cancelled. Memory is the whole process's peak RSS (ru_maxrss from
wait4) of the M-step run. Medians over --runs rounds; the trainers alternate within a round.

Data (made once in .cache/bench_real/, from --oasst by `python -m selfreward.recipes.oasst`): SFT takes the
first M x batch rows of ift.jsonl (one user turn, one assistant turn); DPO the first M x batch groups of
groups_train.jsonl with two or more replies, the best-ranked reply chosen and the worst rejected. Both
trainers see the same examples in the same order (ours --no-shuffle, TRL train_sampling_strategy
"sequential"), render them with the model's chat template, and truncate at --max-length.

Settings: ours are the defaults a user gets (`python train/sft.py --model M --data D --output O --max-steps N
--batch-size 4 --max-length 512 --no-shuffle`; dpo.py the same); TRL's are SFTConfig's / DPOConfig's defaults
(gradient checkpointing on, TRL's chunked LM head, DPO's reference model in the step, dropout off) except
fp32 (bf16=False, as ours; --trl-bf16 keeps TRL's bf16 default, autocast on the CPU) and the sequential order.
Threads: OMP_NUM_THREADS=--threads in every process. On a shared 2-core machine, --threads 1 gives figures
that other jobs do not distort (CPU s per step, from wait4, is then the work itself); at 2 threads a busy core
makes every small op's OpenMP barrier wait (benchmarks/README.md, "SmolLM2 shape (issue 30)").

    python benchmarks/bench_real.py --model /tmp/smollm2-hf                  # SFT and DPO, ours and TRL
    python benchmarks/bench_real.py --model /tmp/smollm2-hf --trainers dpo --runs 3 --steps 2 6

TRL 1.16.0 lives in .cache/trl_venv (benchmarks/bench_dpo.py makes it; --system-site-packages, so the same
torch and transformers). The table goes to stdout, the JSON to .cache/bench_real/results.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_dpo import ensure_trl_venv

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_real"


def make_data(oasst: str, n: int) -> dict[str, Path]:
    """The first n SFT rows and n DPO pairs (OASST prompt, its best reply vs its worst) -> {trainer: path}."""
    seed = CACHE / "oasst"
    if not (seed / "groups_train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "selfreward.recipes.oasst", "--input", oasst, "--out", str(seed)],
                       check=True, cwd=ROOT)
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]   # noqa: E731
    sft = [{"prompt": r["prompt"], "response": r["response"]} for r in read(seed / "ift.jsonl")][:n]
    pairs = []
    for g in read(seed / "groups_train.jsonl"):
        replies = sorted(g["replies"], key=lambda r: r["rank"])
        if len(replies) >= 2:
            pairs.append({"prompt": g["prompt"], "chosen": replies[0]["text"], "rejected": replies[-1]["text"]})
    if min(len(sft), len(pairs[:n])) < n:
        sys.exit(f"error: {oasst} gives {len(sft)} SFT rows and {len(pairs)} pairs, fewer than {n}")
    out = {}
    for name, rows in (("sft", sft), ("dpo", pairs[:n])):
        out[name] = CACHE / f"{name}_{n}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def ours_cmd(trainer: str, a, data: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train" / f"{trainer}.py"), "--model", a.model, "--data", str(data),
            "--output", str(CACHE / f"ours_{trainer}_{steps}"), "--overwrite", "--max-steps", str(steps),
            "--batch-size", str(a.batch), "--max-length", str(a.max_length), "--no-shuffle", *a.ours_args.split()]


def trl_child(trainer: str, model: str, data: str, steps: int, batch: int, max_length: int, bf16: bool,
              setup=None) -> None:
    """TRL's trainer on the same rows (conversational: the model's chat template renders them); `setup(trainer)`
    before training (profile_real.py's hooks)."""
    import torch
    import transformers as tf
    from datasets import Dataset
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    user = lambda r: [{"role": "user", "content": r["prompt"]}]                 # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]                 # noqa: E731
    common = dict(output_dir=str(CACHE / f"trl_{trainer}_{steps}"), per_device_train_batch_size=batch,
                  max_steps=steps, max_length=max_length, use_cpu=True, bf16=bf16, report_to=[],
                  save_strategy="no", train_sampling_strategy="sequential")
    model = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(model.name_or_path)
    if trainer == "sft":
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_list([{"prompt": user(r), "completion": reply(r["response"])} for r in rows])
        t = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer
        ds = Dataset.from_list([{"prompt": user(r), "chosen": reply(r["chosen"]), "rejected": reply(r["rejected"])}
                                for r in rows])
        t = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=ds, processing_class=tok)
    if setup:
        setup(t)
    t.train()


def run(cmd: list[str], env: dict) -> dict:
    """One whole process -> wall seconds, CPU seconds (user + system) and peak RSS (GB) as wait4 reports them."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_gb": ru.ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (with its tokenizer and chat template)")
    ap.add_argument("--oasst", default=str(ROOT.parent / "shared" / "data" / "oasst_en_100_trees.jsonl"))
    ap.add_argument("--trainers", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--who", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    ap.add_argument("--steps", nargs=2, type=int, default=[2, 6], metavar=("N", "M"))
    ap.add_argument("--runs", type=int, default=1, help="rounds; medians over them")
    ap.add_argument("--batch", type=int, default=4, help="examples (pairs) per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-bf16", action="store_true", help="TRL's default bf16 (autocast) instead of fp32")
    ap.add_argument("--ours-args", default="", help="more flags for our trainers, e.g. '--cpu-bf16'")
    ap.add_argument("--trl-child", nargs=3, help=argparse.SUPPRESS)       # trainer data steps
    a = ap.parse_args()
    if a.trl_child:
        trainer, data, steps = a.trl_child
        return trl_child(trainer, a.model, data, int(steps), a.batch, a.max_length, a.trl_bf16)
    CACHE.mkdir(parents=True, exist_ok=True)
    n, m = a.steps
    data = make_data(a.oasst, m * a.batch)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    trl_py = str(ensure_trl_venv()) if "trl" in a.who else None
    res: dict[str, list] = {}
    load0 = os.getloadavg()
    for r in range(a.runs):
        for trainer in a.trainers:
            for who in a.who:
                runs = {}
                for steps in (n, m):
                    cmd = ours_cmd(trainer, a, data[trainer], steps) if who == "ours" else \
                        [trl_py, __file__, "--model", a.model, "--batch", str(a.batch), "--max-length",
                         str(a.max_length), "--trl-child", trainer, str(data[trainer]), str(steps)] + \
                        (["--trl-bf16"] if a.trl_bf16 else [])
                    runs[steps] = run(cmd, env)
                    shutil.rmtree(CACHE / f"{who}_{trainer}_{steps}", ignore_errors=True)   # GBs of checkpoints
                per = lambda k: (runs[m][k] - runs[n][k]) / (m - n)           # noqa: E731
                rec = {"step_s": per("wall_s"), "step_cpu_s": per("cpu_s"), "peak_gb": runs[m]["peak_gb"],
                       "whole_s": runs[m]["wall_s"], "runs": runs}
                res.setdefault(f"{trainer}/{who}", []).append(rec)
                print(f"[bench_real] round {r + 1}: {trainer} {who}: {rec['step_s']:.2f} s/step, "
                      f"{rec['peak_gb']:.2f} GB peak, {m} steps {rec['whole_s']:.1f} s whole "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("step_s", "step_cpu_s", "peak_gb", "whole_s")}
           for k, v in res.items()}
    load1 = os.getloadavg()
    (CACHE / "results.json").write_text(json.dumps({"args": vars(a), "median": med, "runs": res,
                                                    "load_before": load0, "load_after": load1}, indent=1))
    print(f"\n{a.batch} examples / step, max {a.max_length} tokens, {a.threads} threads, {n}- and {m}-step runs "
          f"differenced, median of {a.runs}; TRL {'bf16' if a.trl_bf16 else 'fp32'}; ours {a.ours_args or 'defaults'}; load average before {load0}, "
          f"after {load1}\n")
    print("| | ours | TRL 1.16 | ratio (TRL time / ours; our peak / TRL's) |\n|---|---|---|---|")
    for trainer in a.trainers:
        o, t = med.get(f"{trainer}/ours"), med.get(f"{trainer}/trl")
        cell = lambda x, k: "-" if x is None else f"{x[k]:.2f} s, {x['peak_gb']:.2f} GB peak"  # noqa: E731
        step = lambda x: "-" if x is None else \
            f"{x['step_s']:.2f} s ({x['step_cpu_s']:.2f} s CPU), {x['peak_gb']:.2f} GB peak"  # noqa: E731
        ratio = f"{t['step_s'] / o['step_s']:.2f}x speed ({t['step_cpu_s'] / o['step_cpu_s']:.2f}x CPU), " \
            f"{o['peak_gb'] / t['peak_gb']:.2f}x memory" if o and t else "-"
        print(f"| {trainer.upper()} per step | {step(o)} | {step(t)} | {ratio} |")
        ratio = f"{t['whole_s'] / o['whole_s']:.2f}x" if o and t else "-"
        print(f"| {trainer.upper()} whole process, {m} steps | {cell(o, 'whole_s')} | {cell(t, 'whole_s')} | {ratio} |")


if __name__ == "__main__":
    main()
