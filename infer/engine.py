"""The Python API: generate, score, next_token_logprobs over one paged KV pool.

    eng = Engine.from_pretrained("path/to/model")
    outs = eng.generate([ids1, ids2], SamplingParams(temperature=0.7, top_p=0.9, seed=0), n=4)
    outs[0][3].text, outs[0][3].token_ids, outs[0][3].finish_reason

The prefix cache lives as long as the engine, so a rubric or few-shot prefix shared across calls is
computed once. See infer/README.md for the design.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

import selfreward.kernels.ops as K
from selfreward.infer.block_manager import BlockManager
from selfreward.infer.runner import Runner, default_num_blocks
from selfreward.infer.sampling import sample, token_logprobs
from selfreward.infer.scheduler import Scheduler
from selfreward.infer.sequence import Completion, Kind, SamplingParams, Sequence
from selfreward.model.fused import fuse_for_inference


def _load_tokenizer(path: Path):
    from selfreward.model.tokenizer import Tokenizer
    if not any((path / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    return Tokenizer.load(path)


class Engine:
    def __init__(self, model, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, prefix_cache: bool = True,
                 cuda_graphs: bool = False):
        """max_num_batched_tokens: the token budget of a step; a longer prompt is prefilled in chunks.
        cuda_graphs: replay the decode step from CUDA graphs captured per batch-size bucket (CUDA only;
        infer/cuda_graphs.py; untested: no GPU has run it)."""
        self.model = model.eval()
        self.fused = fuse_for_inference(model)   # CPU: weights re-stored in place for decode (model/fused.py)
        self.tokenizer = tokenizer
        if cuda_graphs and not next(model.parameters()).is_cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device (it is on "
                             f"{next(model.parameters()).device})")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        num_blocks = num_blocks or default_num_blocks(model, block_size, max_num_seqs)
        self.bm = BlockManager(num_blocks, block_size, prefix_cache)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens)
        self.runner = Runner(model, num_blocks, block_size, cuda_graphs=cuda_graphs, max_batch=max_num_seqs)
        self.eos = set(model.cfg.eos_ids)
        if tokenizer is not None:   # EOS and the template's end-of-turn ids (generation_config.json)
            extra = list(getattr(tokenizer, "stop_ids", [])) + [getattr(tokenizer, "eos_id", None)]
            self.eos.update(t for t in extra if t is not None and t >= 0)
        self.max_len = model.cfg.max_position_embeddings
        self.generated_tokens = 0

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", **kw) -> "Engine":
        from selfreward.model.checkpoint import load_model
        return cls(load_model(path, dtype=dtype, device=device), _load_tokenizer(Path(path)), **kw)

    @property
    def stats(self) -> dict:
        return {"prefill_computed": self.bm.prefill_computed, "prefix_hit": self.bm.prefill_hit,
                "generated": self.generated_tokens, "preempted": self.scheduler.num_preempted}

    # -- public API --------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 n: int = 1, progress: bool = False,
                 on_request: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        """Sample n completions per prompt -> [per prompt][per sample]. on_request(i, completions) is
        called as soon as all n samples of prompt i are done (sample.py writes its records there)."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self._check_prompt(p, i)
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.scheduler.add(Sequence(list(p), sp, request=i, n_forks=n, seed=seed))

        left = [n] * len(prompts)

        def collect(seq: Sequence):
            results[seq.request][seq.sample] = self._completion(seq)
            left[seq.request] -= 1
            if on_request is not None and left[seq.request] == 0:
                on_request(seq.request, results[seq.request])
        self._run(collect, len(prompts) * n, progress)
        return results

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs (full-vocabulary log-softmax) of each continuation token given the
        prompt and the continuation tokens before it."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        out: list[list[float]] = [[] for _ in prompts]
        todo = 0
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            self._check_prompt(list(p) + list(c), i)
            if c:
                self.scheduler.add(Sequence(list(p) + list(c), SamplingParams(), kind=Kind.SCORE, request=i,
                                            num_prompt=len(p)))
                todo += 1

        def collect(seq: Sequence):
            out[seq.request] = seq.logprobs
        self._run(collect, todo, False)
        return out

    def next_token_logprobs(self, prompts: list[list[int]], candidate_ids: list[int]) -> torch.Tensor:
        """[B, C] log-probs (full-vocabulary softmax) of each candidate token right after each prompt."""
        out = torch.zeros(len(prompts), len(candidate_ids))
        self._cands = torch.tensor(candidate_ids, device=self.runner.device)
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
            self.scheduler.add(Sequence(list(p), SamplingParams(), kind=Kind.NEXT, request=i))

        def collect(seq: Sequence):
            out[seq.request] = torch.tensor(seq.logprobs)
        self._run(collect, len(prompts), False)
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def reply_ids(self, c: Completion) -> list[int]:
        """A completion's ids without the stop token that ended it (a trainer appends the turn's end)."""
        stop = c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in self.eos
        return list(c.token_ids[:-1] if stop else c.token_ids)

    def _check_prompt(self, ids: list[int], i: int) -> None:
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's max_position_embeddings is "
                             f"{self.max_len}")

    def _run(self, collect, total: int, progress: bool) -> None:
        done, t0, last = 0, time.perf_counter(), 0.0
        gen0 = self.generated_tokens
        while not self.scheduler.done():
            for seq in self._step():
                collect(seq)
                done += 1
            now = time.perf_counter()
            if progress and (now - last > 2.0 or self.scheduler.done()):
                last, el = now, now - t0
                tps = (self.generated_tokens - gen0) / max(el, 1e-9)
                eta = el / done * (total - done) if done else float("nan")
                print(f"[infer] {done}/{total} samples, {self.generated_tokens - gen0} tokens, "
                      f"{tps:.1f} tok/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def _step(self) -> list[Sequence]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        self.runner.copy_blocks(self.bm.take_copies())
        finished: list[Sequence] = []
        gen: list[Sequence] = []
        rows: list[int] = []
        if is_prefill:
            h, starts = self.runner.prefill(seqs)
            for s, st in zip(seqs, starts):
                base = s.num_cached
                s.num_cached = end = base + s.chunk
                if s.kind is Kind.SCORE:   # chunk by chunk: the log-probs of the positions it computed
                    a, b = max(base, s.need_from), min(end, len(s) - 1)
                    if b > a:
                        with torch.inference_mode():
                            x = h[st + a - base:st + b - base]
                            t = torch.tensor(s.token_ids[a + 1:b + 1], device=h.device)
                            vp = getattr(self.model, "score_logprobs", None)   # vocab-parallel (infer/parallel.py)
                            lp = vp(x, t) if vp is not None else K.linear_logprobs(x, self.model.lm_head_weight, t)
                        s.logprobs += lp.float().tolist()
                    if end == len(s):
                        finished.append(s)
                elif end < len(s):
                    continue                # chunked prefill: more of this prompt in a later step
                elif s.kind is Kind.GENERATE:
                    for child in self._fork(s):
                        gen.append(child)
                        rows.append(st + len(s) - 1 - base)
                else:
                    with torch.inference_mode():
                        logits = self.model.logits(h[st + len(s) - 1 - base][None])[0]
                        s.logprobs = logits.log_softmax(-1)[self._cands].tolist()
                    finished.append(s)
        else:
            seqs = sorted(seqs, key=len, reverse=True)   # the CPU decode twin gathers by groups of similar length
            h = self.runner.decode(seqs)
            for s in seqs:
                self.bm.written(s)
            gen, rows = seqs, list(range(len(seqs)))
        if gen:
            done, tokens = self._sample(gen, h, rows)
            finished += done
            if not is_prefill:
                self.runner.sampled(tokens)
        for s in finished:
            self.scheduler.finish(s)
        if is_prefill:
            self.scheduler.start([s for s in gen if s.finish_reason is None])
        else:
            self.scheduler.drop_finished()
        return finished

    def _fork(self, s: Sequence) -> list[Sequence]:
        """At its first sampled token a request with n samples becomes n sequences sharing its blocks."""
        if s.generator is None and s.params.temperature > 0:
            s.generator = torch.Generator().manual_seed(s.seed + s.sample)
        out = [s]
        for j in range(1, s.n_forks):
            c = Sequence(list(s.token_ids), s.params, request=s.request, sample=j, seed=s.seed,
                         num_prompt=s.num_prompt)
            if s.params.temperature > 0:
                c.generator = torch.Generator().manual_seed(s.seed + j)
            self.bm.fork(s, c)
            out.append(c)
        s.n_forks = 1
        return out

    @torch.inference_mode()
    def _sample(self, seqs: list[Sequence], h: torch.Tensor, rows: list[int]) -> tuple[list[Sequence], torch.Tensor]:
        """-> (the sequences that finished, the sampled ids [len(seqs)])."""
        uniq = sorted(set(rows))
        if len(uniq) == h.shape[0] and uniq == rows:     # decode: every row, in order
            logits = self.model.logits(h)                                    # [B, V] fp32
        else:
            logits = self.model.logits(h[torch.tensor(uniq, device=h.device)])   # [U, V] fp32
        if len(uniq) != len(rows):
            where = {r: i for i, r in enumerate(uniq)}
            logits = logits[torch.tensor([where[r] for r in rows], device=h.device)]
        ps = [s.params for s in seqs]
        tokens = sample(logits, [p.temperature for p in ps], [p.top_p for p in ps], [p.top_k for p in ps],
                        [s.generator for s in seqs])
        lps = token_logprobs(logits, tokens).tolist() if any(p.logprobs for p in ps) else None
        finished = []
        for i, (s, t) in enumerate(zip(seqs, tokens.tolist())):
            s.token_ids.append(t)
            if lps is not None and s.params.logprobs:
                s.logprobs.append(lps[i])
            if self._finished(s, t):
                finished.append(s)
        self.generated_tokens += len(seqs)
        return finished, tokens

    def _finished(self, s: Sequence, t: int) -> bool:
        p = s.params
        if t in p.stop_token_ids or (not p.ignore_eos and t in self.eos):
            s.finish_reason = "stop"
        elif p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(s.output_ids)
            cuts = [i for i in (text.find(x) for x in p.stop) if i >= 0]
            if cuts:
                s.text, s.finish_reason = text[:min(cuts)], "stop"
        if s.finish_reason is None and (len(s.output_ids) >= p.max_tokens or len(s) >= self.max_len):
            s.finish_reason = "length"
        return s.finish_reason is not None

    def _completion(self, s: Sequence) -> Completion:
        ids = s.output_ids
        text = s.text
        if text is None:
            text = ""
            if self.tokenizer is not None:
                stopped_by_token = s.finish_reason == "stop" and ids and (
                    ids[-1] in s.params.stop_token_ids or (not s.params.ignore_eos and ids[-1] in self.eos))
                text = self.tokenizer.decode(ids[:-1] if stopped_by_token else ids)
        return Completion(token_ids=list(ids), text=text, logprobs=list(s.logprobs) if s.params.logprobs else None,
                          finish_reason=s.finish_reason)
