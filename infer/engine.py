"""The engine: generate, score, next_token_logprobs over one paged KV pool (infer/README.md, "API")."""

from dataclasses import replace
from typing import Callable, Iterator

import torch

import selfreward.kernels.ops as K
from selfreward.infer.block_manager import BlockManager
from selfreward.infer.config import EngineConfig
from selfreward.infer.runner import Runner, default_num_blocks
from selfreward.infer.sampling import sample, token_logprobs
from selfreward.infer.scheduler import Scheduler
from selfreward.infer.sequence import Completion, Kind, SamplingParams, Sequence, per_prompt
from selfreward.model.fused import fuse_for_inference
from selfreward.progress import Progress
from selfreward.ranges import check_number


class Engine:
    def __init__(self, model, tokenizer=None, cfg: EngineConfig | None = None, **fields):
        """`model` on its device and dtype (this rank's shard under tensor parallelism); `cfg` with `fields`
        replaced: the pool and batching settings (device, dtype and tensor_parallel are the model's)."""
        self.cfg = cfg = replace(cfg or EngineConfig(), **fields)
        self.model = model.eval()
        self.fused = fuse_for_inference(model)   # CPU: weights re-stored in place for decode (model/fused.py)
        self.tokenizer = tokenizer
        p = next(model.parameters())
        if cfg.cuda_graphs and not p.is_cuda:
            raise ValueError(f"cuda_graphs needs the model on a CUDA device (it is on {p.device})")
        cfg.check()
        num_blocks = cfg.num_blocks or default_num_blocks(model, cfg.block_size, cfg.max_num_seqs)
        self.bm = BlockManager(num_blocks, cfg.block_size, cfg.prefix_cache)
        self.scheduler = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = Runner(model, num_blocks, cfg.block_size, cfg.cuda_graphs, cfg.max_num_seqs)
        # EOS and the template's end-of-turn ids (generation_config.json)
        extra = [*getattr(tokenizer, "stop_ids", []), getattr(tokenizer, "eos_id", None)]
        self.eos = set(model.cfg.eos_ids) | {t for t in extra if t is not None and t >= 0}
        self.max_len = model.cfg.max_position_embeddings
        self.generated_tokens = 0

    @property
    def stats(self) -> dict:
        return {"prefill_computed": self.bm.prefill_computed, "prefix_hit": self.bm.prefill_hit,
                "generated": self.generated_tokens, "preempted": self.scheduler.num_preempted}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 n: int = 1, progress: bool = False,
                 on_request: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        """n samples per prompt -> [per prompt][per sample]; on_request(i, completions) once prompt i is done."""
        plist = per_prompt(prompts, params)
        check_number("n", n)
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self._check_prompt(p, i)
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item())
            gens = [torch.Generator().manual_seed(seed + j) if sp.temperature > 0 else None for j in range(n)]
            self.scheduler.add(Sequence(list(p), sp, request=i, generators=gens))
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        left = [n] * len(prompts)
        for s in self._drain(len(prompts) * n, progress):
            results[s.request][s.sample] = self._completion(s)
            left[s.request] -= 1
            if on_request is not None and left[s.request] == 0:
                on_request(s.request, results[s.request])
        return results

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each continuation token."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        out: list[list[float]] = [[] for _ in prompts]
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            self._check_prompt(list(p) + list(c), i)
            if c:
                self.scheduler.add(Sequence(list(p) + list(c), SamplingParams(), kind=Kind.SCORE, request=i,
                                            num_prompt=len(p)))
        for s in self._drain(sum(1 for c in continuations if c)):
            out[s.request] = s.logprobs
        return out

    def next_token_logprobs(self, prompts: list[list[int]], candidate_ids: list[int]) -> torch.Tensor:
        """[B, C] log-probs of each candidate token right after each prompt."""
        out = torch.zeros(len(prompts), len(candidate_ids))
        self._cands = torch.tensor(candidate_ids, device=self.runner.device)
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
            self.scheduler.add(Sequence(list(p), SamplingParams(), kind=Kind.NEXT, request=i))
        for s in self._drain(len(prompts)):
            out[s.request] = torch.tensor(s.logprobs)
        return out

    def load_weights(self, model, skip: tuple[str, ...] = ()) -> dict:
        """A trainer's weights copied in place (parallel.copy_weights), no request in flight -> {seconds, bytes}."""
        from selfreward.infer.parallel import copy_weights
        if not self.scheduler.done():
            raise RuntimeError("weight sync while the engine still has requests in flight")
        stat = copy_weights(self.model, model, skip)
        self.bm.cache.clear()               # the cached KV came from the old weights
        return stat

    def reply_ids(self, c: Completion) -> list[int]:
        """A completion's ids without the stop token that ended it (a trainer appends the turn's end)."""
        stop = c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in self.eos
        return list(c.token_ids[:-1] if stop else c.token_ids)

    def step(self) -> list[Sequence]:
        """Schedule, run, postprocess -> the sequences that finished."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        outs = self.run(seqs, is_prefill)
        return self.scheduler.postprocess(seqs, outs, is_prefill, self._stopped)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[list[tuple[int, float | None]]]:
        """The model on a step's sequences -> per sequence its samples' (token, log-prob); infer/README.md, "API"."""
        self.runner.copy_blocks(self.bm.take_copies())
        if not is_prefill:
            h = self.runner.decode(seqs)
            return self._sample(seqs, self.model.logits(h), decode=True)
        h, starts = self.runner.prefill(seqs)
        outs: list[list] = [[] for _ in seqs]
        gen, rows = [], []                  # generate requests at their last position, its row in h
        for i, (s, st) in enumerate(zip(seqs, starts)):
            base, end = s.num_cached, s.num_cached + s.chunk
            last = st + end - 1 - base
            if s.kind is Kind.SCORE:        # chunk by chunk: the log-probs of the positions it computed
                a, b = max(base, s.need_from), min(end, len(s) - 1)
                if b > a:
                    x, t = h[st + a - base:st + b - base], torch.tensor(s.token_ids[a + 1:b + 1], device=h.device)
                    vp = getattr(self.model, "score_logprobs", None)   # vocab-parallel (infer/parallel.py)
                    lp = vp(x, t) if vp is not None else K.linear_logprobs(x, self.model.lm_head_weight, t)
                    s.logprobs += lp.float().tolist()
            elif end == len(s) and s.kind is Kind.NEXT:
                s.logprobs = self.model.logits(h[last][None])[0].log_softmax(-1)[self._cands].tolist()
            elif end == len(s):
                gen.append(i)
                rows.append(last)
        if gen:
            x = h if len(rows) == len(h) else h[torch.tensor(rows, device=h.device)]   # rows ascend
            for i, out in zip(gen, self._sample([seqs[i] for i in gen], self.model.logits(x))):
                outs[i] = out
        return outs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, decode: bool = False):
        """logits: one row per sequence -> per sequence a (token, log-prob) per sample it stands for."""
        counts = [len(s.generators) for s in seqs]
        if sum(counts) > len(seqs):         # forks draw from their request's row
            logits = logits.repeat_interleave(torch.tensor(counts, device=logits.device), 0)
        ps = [s.params for s in seqs for _ in s.generators]
        tokens = sample(logits, [p.temperature for p in ps], [p.top_p for p in ps], [p.top_k for p in ps],
                        [g for s in seqs for g in s.generators], [p.min_p for p in ps])
        if decode:
            self.runner.dec.next_tokens = tokens   # the next decode step's input ids, if its batch is this one
        lps = token_logprobs(logits, tokens).tolist() if any(p.logprobs for p in ps) else None
        draws = iter([(t, lps[i] if p.logprobs else None) for i, (t, p) in enumerate(zip(tokens.tolist(), ps))])
        self.generated_tokens += len(ps)
        return [[next(draws) for _ in range(c)] for c in counts]

    def _stopped(self, s: Sequence) -> bool:
        """Set s.finish_reason (and s.text, cut at a stop string) if its newest token ends it."""
        p, t = s.params, s.token_ids[-1]
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
        ids, text = s.output_ids, s.text
        if text is None and self.tokenizer is not None:   # a stop token (no stop-string cut) is left out
            text = self.tokenizer.decode(ids[:-1] if s.finish_reason == "stop" else ids)
        return Completion(token_ids=list(ids), text=text or "", finish_reason=s.finish_reason,
                          logprobs=list(s.logprobs) if s.params.logprobs else None)

    def _check_prompt(self, ids: list[int], i: int) -> None:
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's max_position_embeddings is {self.max_len}")

    def _drain(self, total: int, progress: bool = False) -> Iterator[Sequence]:
        """Step until every request is done, yielding each finished sequence (progress: a progress.Progress line)."""
        bar = Progress("infer", total, unit="samples") if progress else None
        while not self.scheduler.done():
            gen0 = self.generated_tokens
            done = self.step()
            yield from done
            if bar:
                bar.update(len(done), self.generated_tokens - gen0)
