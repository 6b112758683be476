"""Sample completions for a JSONL file of prompts (infer/README.md, "CLI", has the records, resume and
sharding rules).

    python infer/sample.py --model DIR --input prompts.jsonl --output out.jsonl --n 4 \\
        --temperature 0.7 --top-p 0.9 --max-tokens 512 --seed 0
    torchrun --nproc_per_node 8 infer/sample.py --num-samples 4 ...   (each rank takes every world-th
        prompt; under torchrun write --num-samples, torchrun itself rejects --n as ambiguous)
    torchrun --nproc_per_node 8 infer/sample.py --tensor-parallel 4 ...   (2 replicas of 4-way tensor
        parallelism: each replica takes every 2nd prompt, its first rank writes)

A prompt's records go to OUTPUT.partial as soon as all its samples are done (a rerun continues there); a
request without its own seed uses one derived from --seed and its id, so results do not depend on sharding
or on resuming.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from selfreward.infer.sequence import SamplingParams
from selfreward.model.config import ModelConfig
from selfreward.model.tokenizer import check_messages
from selfreward.infer.config import EngineConfig, load_engine, resolve_device
from selfreward.infer.parallel import init_tp
from selfreward.infer.replicas import run_units_tp
from selfreward.cli import error_line, run_main
from selfreward.ranges import ConfigError, check_args
from selfreward.provenance import OutputLock, check_record, claim, file_hash, model_fingerprint, same_file
from selfreward.units import dist_env
from selfreward.records import DataError, check_file, iter_jsonl, nonempty, partial_path, read_jsonl

OVERRIDES = {"max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
             "seed": (int,)}


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
            check_messages(rec["messages"], where)
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
    ap.add_argument("--raw-prompt", action="store_true",
                    help="a 'prompt' record is BOS + its text (no chat template); default: one user turn")
    ap.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA (cuda:LOCAL_RANK), float32 on CPU")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096,
                    help="tokens per engine step; a longer prompt is prefilled in chunks of this size")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="decode from CUDA graphs captured per batch-size bucket (CUDA only; untested)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over when OUTPUT (or its .partial) was made with another model, input or settings")
    ap.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                    help="ranks per model replica: the WORLD_SIZE ranks form WORLD_SIZE/T replicas, each "
                         "holding 1/T of the weights and KV heads (infer/parallel.py); prompts are split "
                         "across replicas, and the first rank of each replica writes")
    return check_args(ap.parse_args(argv))


FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "max_tokens": "--max-tokens",
         "block_size": "--block-size", "max_num_seqs": "--max-num-seqs", "num_blocks": "--num-blocks",
         "max_num_batched_tokens": "--max-num-batched-tokens", "cuda_graphs": "--cuda-graphs"}


def check_flags(args) -> EngineConfig:
    """Every flag checked before any work, each error naming its flag -> the engine's config."""
    def named(e: ValueError) -> ConfigError:
        msg = str(e)
        for k, flag in FLAGS.items():
            msg = msg.replace(f"engine {k}", flag).replace(k, flag)
        return ConfigError(msg)
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: must be >= 1 (samples per prompt)")
    if any(not s for s in args.stop):
        raise ConfigError("--stop '': an empty stop string would end every sample at once")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise ConfigError(f"--num-blocks {args.num_blocks}: must be >= 1 (leave it out to size the pool itself)")
    if same_file(args.input, args.output) or same_file(args.input, partial_path(args.output)):
        raise ConfigError(f"--input {args.input} and --output {args.output} are one file: refusing to write "
                          f"over the input")
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens)
        ecfg = EngineConfig(dtype=args.dtype, block_size=args.block_size, num_blocks=args.num_blocks or 0,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            cuda_graphs=args.cuda_graphs)
        resolve_device(ecfg)                 # checks the config too
    except ValueError as e:
        raise named(e) from None
    return ecfg


def made_by(args) -> dict:
    """What shapes OUTPUT's records: the model, the input, the sampling flags (not the engine's batching)."""
    return {"model_fingerprint": model_fingerprint(args.model),
            "input_hash": file_hash(args.input), "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "max_tokens": args.max_tokens, "seed": args.seed, "stop": list(args.stop),
            "ignore_eos": args.ignore_eos, "logprobs": args.logprobs, "raw_prompt": args.raw_prompt,
            "dtype": args.dtype}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = dist_env()
    dist = None
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    out, lock = Path(args.output), None
    try:
        ecfg = check_flags(args)
        try:                           # a flag too: checked before the input, the model or OUTPUT
            tp = init_tp(args.tensor_parallel)
        except ValueError as e:
            raise InputError(str(e)) from None
        ecfg.tensor_parallel = tp.size
        check_file(args.input)
        requests = nonempty(read_requests(args.input), args.input, "prompts")
        if not os.path.isdir(args.model):
            raise InputError(f"--model {args.model}: not a checkpoint folder")
        ModelConfig.from_json(args.model)  # a bad config.json is refused before OUTPUT is claimed
        key = lambda r: id_key(r["id"])   # noqa: E731
        lock = _claim(out, args, rank, world, dist)
        if os.path.exists(args.output):
            done = {key(r) for r in read_jsonl(args.output)}
            if all(key(r) in done for r in requests):
                print(f"[sample] rank {rank}/{world}: 0 prompts to do ({len(requests)} already done)",
                      file=sys.stderr, flush=True)
                return 0
        mine = [r for i, r in enumerate(requests) if i % tp.num_replicas == tp.replica]
        print(f"[sample] rank {rank}/{world}: {len(mine)} prompts", file=sys.stderr, flush=True)
        eng = load(args, ecfg)
        run_units_tp(tp, Path(args.output), requests, args.n, key, partial(work, args, eng), max(1, len(requests)),
                     f"sample rank {rank}", "prompts")
        if rank == 0:
            print(f"[sample] wrote {len(read_jsonl(args.output))} records to {args.output}", file=sys.stderr,
                  flush=True)
    except DataError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    finally:
        if lock is not None:           # only the lock's holder tidies: a refused second run leaves the files alone
            for p in (partial_path(out), partial_path(out.with_name(f"{out.name}.rank{rank}"))):
                if p.exists() and p.stat().st_size == 0:
                    p.unlink()         # a run that wrote nothing leaves nothing
            lock.__exit__(None, None, None)
        if dist is not None:
            dist.destroy_process_group()
    return 0


def _claim(out: Path, args, rank: int, world: int, dist):
    """Rank 0 claims OUTPUT (lock, provenance record, --overwrite clears the old files); after a barrier
    every other rank locks its own shard and checks the record rank 0 left -> the context to exit at the end."""
    made = made_by(args)

    def clear() -> None:
        for p in [out, partial_path(out)] + list(out.parent.glob(f"{glob.escape(out.name)}.rank*")):
            p.unlink(missing_ok=True)
    if rank == 0:
        ctx = claim(out, made, [args.input], args.overwrite, clear=clear)
        ctx.__enter__()
    if world > 1:
        dist.barrier()
    if rank != 0:
        ctx = OutputLock(out.with_name(f"{out.name}.rank{rank}")).acquire()
        check_record(out, made, "--overwrite")
    return ctx


def load(args, ecfg: EngineConfig):
    """The engine, with a tokenizer to encode prompts with: a bad checkpoint fails before any work."""
    try:
        eng = load_engine(args.model, ecfg)
    except ValueError as e:   # TP: a layout T cannot split (heads, KV heads, intermediate)
        if ecfg.tensor_parallel == 1:
            raise
        raise InputError(f"{args.model}: {e}") from None
    if eng.tokenizer is None:
        raise InputError(f"{args.model}: no tokenizer.model or tokenizer.json to encode prompts with")
    return eng


def work(args, eng, batch: list[tuple[int, dict]], emit) -> None:
    """The units' work: one engine call over the batch, a unit's records emitted (and flushed to the
    .partial file by selfreward.records) as soon as all its samples are done."""
    prompts, params = [], []
    for _, r in batch:
        ids = eng.tokenizer.prompt_ids(r, raw=args.raw_prompt)
        if len(ids) >= eng.max_len:
            raise InputError(f"{r['_where']}: field '{'messages' if 'messages' in r else 'prompt'}': "
                             f"{len(ids)} tokens, the model takes at most {eng.max_len - 1}")
        prompts.append(ids)
        params.append(params_for(r, args))

    def write(i: int, comps) -> None:
        recs = [{"id": batch[i][1]["id"], "sample": j, "text": c.text, "token_ids": c.token_ids,
                 "finish_reason": c.finish_reason, **({"logprobs": c.logprobs} if args.logprobs else {})}
                for j, c in enumerate(comps)]
        emit(batch[i][0], recs, sum(len(c.token_ids) for c in comps))
    eng.generate(prompts, params, n=args.n, on_request=write)


if __name__ == "__main__":
    run_main(main, interrupted="interrupted: every finished prompt is kept in OUTPUT.partial (under torchrun "
                               "OUTPUT.rank<r>.partial); rerun the same command to continue")
