"""Sample completions for a JSONL file of prompts.

    python infer/sample.py --model DIR --input prompts.jsonl --output out.jsonl --n 4 \\
        --temperature 0.7 --top-p 0.9 --max-tokens 512 --seed 0
    torchrun --nproc_per_node 8 infer/sample.py --num-samples 4 ...   (each rank takes every world-th
        prompt; under torchrun write --num-samples, torchrun itself rejects --n as ambiguous)

Input records: {"id": ..., "prompt": "raw text"} (tokenized after BOS, no template) or
{"id": ..., "messages": [{"role": ..., "content": ...}, ...]} (chat template + generation prompt); either
may override max_tokens, temperature, top_p, top_k, seed. Output: one record per sample,
{"id", "sample", "text", "token_ids", "finish_reason"[, "logprobs"]}, in input order.

Resume: each rank appends a prompt's records to OUTPUT.part<rank> (flushed) as soon as all its samples
are done; a rerun skips ids already complete in the output or in any part file, and at the end rank 0
merges everything into OUTPUT (temp file + os.replace) and removes the parts. A request without its own
seed uses one derived from --seed and its id, so results do not depend on sharding or on resuming.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from selfreward.infer.sequence import SamplingParams
from selfreward.records import DataError, iter_jsonl, write_atomic

OVERRIDES = {"max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
             "seed": (int,)}
ROLES = ("system", "user", "assistant")


InputError = DataError   # bad input: the message names file, line and field


def id_key(v) -> str:
    return json.dumps(v)


def read_requests(path: str | Path) -> list[dict]:
    """Parse and check every line first, so a bad line stops the run before any work."""
    out, seen = [], {}
    for line_no, rec in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if "id" not in rec or isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
            raise InputError(f"{where}: field 'id': missing or not a string / integer")
        if ("prompt" in rec) == ("messages" in rec):
            raise InputError(f"{where}: field 'prompt'/'messages': give exactly one of them")
        if "prompt" in rec and not isinstance(rec["prompt"], str):
            raise InputError(f"{where}: field 'prompt': expected a string")
        if "messages" in rec:
            m = rec["messages"]
            if not isinstance(m, list) or not m or not all(
                    isinstance(x, dict) and x.get("role") in ROLES and isinstance(x.get("content"), str) for x in m):
                raise InputError(f"{where}: field 'messages': expected a non-empty list of "
                                 f"{{'role': system|user|assistant, 'content': str}}")
        for k, types in OVERRIDES.items():
            if k in rec and (isinstance(rec[k], bool) or not isinstance(rec[k], types)):
                raise InputError(f"{where}: field '{k}': expected {' or '.join(t.__name__ for t in types)}")
        key = id_key(rec["id"])
        if key in seen:
            raise InputError(f"{where}: field 'id': duplicate {rec['id']!r} (first on line {seen[key]})")
        seen[key] = line_no
        rec["_where"] = where
        out.append(rec)
    return out


def default_seed(base: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}:{key}".encode()).digest()[:7], "little")


def params_for(rec: dict, args) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(rec.get("temperature", args.temperature)), top_p=float(rec.get("top_p", args.top_p)),
            top_k=rec.get("top_k", args.top_k), max_tokens=rec.get("max_tokens", args.max_tokens),
            seed=rec.get("seed", default_seed(args.seed, id_key(rec["id"]))), stop=tuple(args.stop),
            ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    except ValueError as e:
        raise InputError(f"{rec['_where']}: {e}") from None


def read_records(path: str) -> list[dict]:
    """Output / part records; a line cut short by a kill (not valid JSON) is dropped."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(r, dict) and "id" in r and "sample" in r:
                    out.append(r)
    return out


def complete_groups(records: list[dict], n: int) -> dict[str, list[dict]]:
    """id key -> its n sample records, for ids with all of samples 0..n-1 present."""
    groups: dict[str, dict[int, dict]] = {}
    for r in records:
        groups.setdefault(id_key(r["id"]), {})[r["sample"]] = r
    return {k: [g[i] for i in range(n)] for k, g in groups.items() if all(i in g for i in range(n))}


def atomic_write_lines(path: str, lines: list[str]) -> None:
    write_atomic(path, "".join(lines))


def merge(output: str, requests: list[dict], n: int) -> int:
    """Existing output + every part file -> OUTPUT in input order (atomic); parts removed. -> #records."""
    parts = sorted(glob.glob(glob.escape(output) + ".part*"))
    records = read_records(output)
    for p in parts:
        records += read_records(p)
    groups = complete_groups(records, n)
    lines = [json.dumps(r) + "\n" for req in requests for r in groups.get(id_key(req["id"]), [])]
    atomic_write_lines(output, lines)
    for p in parts:
        os.remove(p)
    return len(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                    help="samples per prompt (under torchrun write --num-samples: torchrun reads --n as its own)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--logprobs", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist = None
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        if not os.path.isfile(args.input):
            raise InputError(f"{args.input}: no such file")
        requests = read_requests(args.input)
        n = args.n
        part = f"{args.output}.part{rank}"
        done = set(complete_groups(read_records(args.output), n))
        for p in glob.glob(glob.escape(args.output) + ".part*"):
            done |= set(complete_groups(read_records(p), n))
        mine = [r for i, r in enumerate(requests) if i % world == rank and id_key(r["id"]) not in done]
        # keep only whole prompts in this rank's part file (a kill may have cut its last write)
        own = complete_groups(read_records(part), n)
        atomic_write_lines(part, [json.dumps(r) + "\n" for g in own.values() for r in g])
        print(f"[sample] rank {rank}/{world}: {len(mine)} prompts to do ({len(done)} already done)",
              file=sys.stderr, flush=True)
        if mine:
            _generate(args, mine, part, device, rank)
        if dist is not None:
            dist.barrier()
        if rank == 0:
            k = merge(args.output, requests, n)
            print(f"[sample] wrote {k} records to {args.output}", file=sys.stderr, flush=True)
        if dist is not None:
            dist.barrier()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return 0


def _generate(args, mine: list[dict], part: str, device: str, rank: int) -> None:
    from selfreward.infer.engine import Engine
    eng = Engine.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device,
                                 block_size=args.block_size, num_blocks=args.num_blocks,
                                 max_num_seqs=args.max_num_seqs)
    if eng.tokenizer is None:
        raise InputError(f"{args.model}: no tokenizer.model or tokenizer.json to encode prompts with")
    prompts, params = [], []
    for r in mine:
        ids = eng.tokenizer.prompt_ids(r)
        if len(ids) >= eng.max_len:
            raise InputError(f"{r['_where']}: field '{'messages' if 'messages' in r else 'prompt'}': "
                             f"{len(ids)} tokens, the model takes at most {eng.max_len - 1}")
        prompts.append(ids)
        params.append(params_for(r, args))
    t0, last, done, toks = time.perf_counter(), [0.0], [0], [0]
    with open(part, "a") as f:
        def write(i: int, comps) -> None:
            rid = mine[i]["id"]
            for j, c in enumerate(comps):
                rec = {"id": rid, "sample": j, "text": c.text, "token_ids": c.token_ids,
                       "finish_reason": c.finish_reason}
                if args.logprobs:
                    rec["logprobs"] = c.logprobs
                f.write(json.dumps(rec) + "\n")
                toks[0] += len(c.token_ids)
            f.flush()
            done[0] += 1
            now = time.perf_counter()
            if now - last[0] > 2.0 or done[0] == len(mine):
                last[0], el = now, now - t0
                eta = el / done[0] * (len(mine) - done[0])
                print(f"[sample] rank {rank}: {done[0]}/{len(mine)} prompts, {toks[0]} tokens, "
                      f"{toks[0] / el:.1f} tok/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
        eng.generate(prompts, params, n=args.n, on_request=write)


if __name__ == "__main__":
    sys.exit(main())
