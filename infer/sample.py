"""Sample completions for a JSONL file of prompts (infer/README.md, "CLI": the records, resume and sharding).

    python infer/sample.py --model DIR --input prompts.jsonl --output out.jsonl --n 4 \\
        --temperature 0.7 --top-p 0.9 --max-tokens 512 --seed 0
    torchrun --nproc_per_node 8 infer/sample.py --num-samples 4 ...        (rank r takes prompts r, r + world, ...)
    torchrun --nproc_per_node 8 infer/sample.py --tensor-parallel 4 ...    (2 replicas of 4-way tensor parallelism)
"""

import glob
import hashlib
import json
import os
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from selfreward import cli
from selfreward.infer.config import EngineConfig, load_engine, resolve_device
from selfreward.infer.parallel import init_tp, run_stage_units, stage_group
from selfreward.infer.sequence import SamplingParams
from selfreward.model.config import ModelConfig
from selfreward.model.tokenizer import check_messages
from selfreward.provenance import check_record, claim, made_by, output_lock, same_file
from selfreward.records import DataError, check_file, iter_jsonl, nonempty, partial_path, read_jsonl
from selfreward.units import barrier, dist_env

OVERRIDES = {"max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
             "min_p": (int, float), "seed": (int,)}


@dataclass
class SampleConfig(EngineConfig):
    """The engine's settings (flags of their own: --dtype, --block-size, ...; no --device) and the sampling ones."""
    model: str = cli.checkpoint()         # checkpoint folder
    input: str = cli.input_file()         # JSONL of requests
    output: str = cli.passive("")         # JSONL of samples (OUTPUT.partial while running)
    n: int = 1                            # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                        # 0 = off
    min_p: float = 0.0                    # keep tokens at >= min_p x the top token's probability; 0 = off
    max_tokens: int = 256
    seed: int = 0                         # a request without its own seed: one derived from this and its id
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False                # each sampled token's log-prob under the model
    raw_prompt: bool = False              # a 'prompt' record is BOS + its text; default: one user turn (chat template)
    overwrite: bool = cli.passive(False)  # start over when OUTPUT (or its .partial) was made otherwise


def parse(argv: list[str] | None) -> SampleConfig:
    """The door: the flags (numbers by their ranges), then what no single number's range covers."""
    p = cli.parser(SampleConfig, __doc__, skip={"": {"device"}}, own=("n", "stop"))
    p.add_argument("--n", "--num-samples", dest="n", type=int, help="samples per prompt; under torchrun write "
                   "--num-samples: torchrun reads --n as its own (default: 1)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable) (default: [])")
    cfg = cli.build(SampleConfig, p.parse_args(argv))
    for name in ("model", "input", "output"):
        if not getattr(cfg, name):
            raise cli.ConfigError(f"--{name} is required")
    if any(not s for s in cfg.stop):
        raise cli.ConfigError("--stop '': an empty stop string would end every sample at once")
    if same_file(cfg.input, cfg.output) or same_file(cfg.input, partial_path(cfg.output)):
        raise cli.ConfigError(f"--input {cfg.input} and --output {cfg.output} are one file: refusing to write "
                              f"over the input")
    try:
        resolve_device(cfg)
    except ValueError as e:   # "engine cuda_graphs ..." -> "--cuda-graphs ..."
        raise cli.ConfigError(re.sub(r"engine (\w+)", lambda m: "--" + m[1].replace("_", "-"), str(e))) from None
    return cfg


def key(rec: dict) -> str:
    """A request's (or record's) unit: its id as JSON, so 1 and "1" are two."""
    return json.dumps(rec["id"])


def read_requests(path: str | Path) -> list[dict]:
    """Parse and check every line first, so a bad line stops the run before any work."""
    out, seen = [], {}
    for line_no, rec in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if "id" not in rec or isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int)):
            raise DataError(f"{where}: field 'id': missing or not a string / integer")
        if ("prompt" in rec) == ("messages" in rec):
            raise DataError(f"{where}: field 'prompt'/'messages': give exactly one of them")
        if "prompt" in rec and not isinstance(rec["prompt"], str):
            raise DataError(f"{where}: field 'prompt': expected a string")
        if "messages" in rec:
            check_messages(rec["messages"], where)
        for k, types in OVERRIDES.items():
            if k in rec and (isinstance(rec[k], bool) or not isinstance(rec[k], types)):
                raise DataError(f"{where}: field '{k}': expected {' or '.join(t.__name__ for t in types)}")
        if key(rec) in seen:
            raise DataError(f"{where}: field 'id': duplicate {rec['id']!r} (first on line {seen[key(rec)]})")
        seen[key(rec)] = line_no
        rec["_where"] = where
        out.append(rec)
    return out


def params_for(rec: dict, cfg: SampleConfig) -> SamplingParams:
    """The record's OVERRIDES over the flags; without its own seed, one derived from --seed and its id."""
    given = {k: rec.get(k, getattr(cfg, k)) for k in OVERRIDES}
    if "seed" not in rec:
        given["seed"] = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{key(rec)}".encode()).digest()[:7], "little")
    try:
        return SamplingParams(**given, stop=tuple(cfg.stop), ignore_eos=cfg.ignore_eos, logprobs=cfg.logprobs)
    except ValueError as e:
        raise DataError(f"{rec['_where']}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    rank, world = dist_env()
    out = Path(cfg.output)
    with stage_group("", world), ExitStack() as held:
        try:
            tp = init_tp(cfg.tensor_parallel)   # a flag too: checked before the input, the model or OUTPUT
            check_file(cfg.input)
            requests = nonempty(read_requests(cfg.input), cfg.input, "prompts")
            if not os.path.isdir(cfg.model):
                raise DataError(f"--model {cfg.model}: not a checkpoint folder")
            ModelConfig.from_json(cfg.model)  # a bad config.json is refused before OUTPUT is claimed
            _claim(held, out, cfg, rank, world)
            held.callback(_tidy, out, rank)   # only the lock's holder tidies: a refused run leaves the files
            if out.exists() and {key(r) for r in requests} <= {key(r) for r in read_jsonl(out)}:
                print(f"[sample] rank {rank}/{world}: 0 prompts to do ({len(requests)} already done)",
                      file=sys.stderr, flush=True)
                return 0
            mine = len(requests[tp.replica::tp.num_replicas])
            print(f"[sample] rank {rank}/{world}: {mine} prompts", file=sys.stderr, flush=True)
            eng = load_engine(cfg.model, cfg)   # a bad checkpoint fails here, before any work
            if eng.tokenizer is None:
                raise DataError(f"{cfg.model}: no tokenizer.model or tokenizer.json to encode prompts with")
            run_stage_units(cfg.tensor_parallel, max(1, len(requests)), rank, world, out, requests, cfg.n, key,
                            partial(work, cfg, eng), f"sample rank {rank}", "prompts")
            if rank == 0:
                print(f"[sample] wrote {len(read_jsonl(out))} records to {out}", file=sys.stderr, flush=True)
        except DataError as e:
            print(cli.error_line(e), file=sys.stderr)
            return 2
    return 0


def _tidy(out: Path, rank: int) -> None:
    """A run that wrote nothing leaves nothing: empty .partial files go."""
    for p in (partial_path(out), partial_path(out.with_name(f"{out.name}.rank{rank}"))):
        if p.exists() and p.stat().st_size == 0:
            p.unlink()


def _claim(held: ExitStack, out: Path, cfg: SampleConfig, rank: int, world: int) -> None:
    """Rank 0 claims OUTPUT (lock, provenance record, --overwrite clears the old files); after a barrier
    every other rank locks its own shard and checks the record rank 0 left; `held` releases them at the end."""
    made = made_by(cfg)

    def clear() -> None:
        for p in [out, partial_path(out)] + list(out.parent.glob(f"{glob.escape(out.name)}.rank*")):
            p.unlink(missing_ok=True)
    if rank == 0:
        held.enter_context(claim(out, made, [cfg.input], cfg.overwrite, clear=clear))
    if world > 1:
        barrier()
    if rank != 0:
        held.enter_context(output_lock(out.with_name(f"{out.name}.rank{rank}")))
        check_record(out, made, "--overwrite")


def work(cfg: SampleConfig, eng, batch: list[tuple[int, dict]], emit) -> None:
    """One engine call over the batch; a prompt's records are emitted once all its samples are done."""
    prompts, params = [], []
    for _, r in batch:
        ids = eng.tokenizer.prompt_ids(r, raw=cfg.raw_prompt)
        if len(ids) >= eng.max_len:
            raise DataError(f"{r['_where']}: field '{'messages' if 'messages' in r else 'prompt'}': "
                            f"{len(ids)} tokens, the model takes at most {eng.max_len - 1}")
        prompts.append(ids)
        params.append(params_for(r, cfg))

    def write(i: int, comps) -> None:
        recs = [{"id": batch[i][1]["id"], "sample": j, "text": c.text, "token_ids": c.token_ids,
                 "finish_reason": c.finish_reason, **({"logprobs": c.logprobs} if cfg.logprobs else {})}
                for j, c in enumerate(comps)]
        emit(batch[i][0], recs, sum(len(c.token_ids) for c in comps))
    eng.generate(prompts, params, n=cfg.n, on_request=write)


if __name__ == "__main__":
    cli.run_main(main, interrupted="interrupted: every finished prompt is kept in OUTPUT.partial (under torchrun "
                                   "OUTPUT.rank<r>.partial); rerun the same command to continue")
