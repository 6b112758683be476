"""nano-vllm's scheduler: the next step's sequences, and what becomes of them after it (infer/README.md)."""

from collections import deque
from typing import Callable

from selfreward.infer.block_manager import BlockManager
from selfreward.infer.sequence import Kind, Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.partial: Sequence | None = None   # admitted, prefilled up to num_cached, more chunks to go
        self.num_preempted = 0
        self._chunk_turn = False                # the last step was a prefill that left a partial prompt

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def done(self) -> bool:
        return not self.waiting and not self.running and self.partial is None

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (this step's sequences, is_prefill); a prefill computes each one's `chunk` tokens from num_cached on."""
        if not (self._chunk_turn and self.running):
            batch = self._prefill_batch()
            if batch:
                self._chunk_turn = self.partial is not None
                return batch, True
        self._chunk_turn = False
        return self._decode_batch(), False

    def _prefill_batch(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        batch: list[Sequence] = []
        tokens = 0
        p, self.partial = self.partial, None
        if p is not None:                       # the partial prompt's next chunk comes first
            p.chunk = min(len(p) - p.num_cached, budget)
            self.bm.computing(p, p.num_cached + p.chunk)
            batch.append(p)
            tokens += p.chunk
        n_running = len(self.running) + sum(len(s.generators) for s in batch)
        while self.waiting and tokens < budget:
            seq = self.waiting[0]
            if n_running + len(seq.generators) > self.max_num_seqs and (batch or self.running):
                break
            if not self.bm.allocate(seq, budget - tokens):
                if not batch and not self.running:
                    raise RuntimeError(f"a sequence of {len(seq)} tokens does not fit in the KV pool "
                                       f"({len(self.bm.blocks)} blocks of {self.bm.block_size}); raise num_blocks")
                break
            self.waiting.popleft()
            batch.append(seq)
            n_running += len(seq.generators)
            tokens += seq.chunk
        last = batch[-1] if batch else None
        if last is not None and last.num_cached + last.chunk < len(last):
            self.partial = last                 # only the step's last sequence can be cut by the budget
        return batch

    def _decode_batch(self) -> list[Sequence]:
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.bm.append(seq)
                kept.append(seq)
        self.running.extend(kept)
        return sorted(kept, key=len, reverse=True)   # the CPU decode twin gathers by groups of similar length

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def postprocess(self, seqs: list[Sequence], outs: list[list[tuple[int, float | None]]], is_prefill: bool,
                    stopped: Callable[[Sequence], bool]) -> list[Sequence]:
        """After a step's forward: advance the caches, fork, append each sample's (token, log-prob), free the
        finished (`stopped` decides for a sampled token; others finish with their last chunk) -> the finished."""
        finished, started = [], []
        for s, out in zip(seqs, outs):
            if is_prefill:
                s.num_cached += s.chunk
                if s.num_cached < len(s):
                    continue                # chunked prefill: more of this prompt in a later step
            else:                           # a decode step stored position len-1: key its block if that filled it
                s.num_cached = len(s)
                self.bm.computing(s, len(s))
            if s.kind is not Kind.GENERATE:
                finished.append(s)
                continue
            for c, (t, lp) in zip(self._fork(s), out):
                c.token_ids.append(t)
                if lp is not None:
                    c.logprobs.append(lp)
                (finished if stopped(c) else started).append(c)
        for s in finished:
            self.bm.free_seq(s)
        if is_prefill:
            self.running.extend(started)
        elif finished:
            self.running = deque(s for s in self.running if s.finish_reason is None)
        return finished

    def _fork(self, s: Sequence) -> list[Sequence]:
        """At its first sampled token a request with n samples becomes n sequences sharing its blocks."""
        kids = [Sequence(list(s.token_ids), s.params, request=s.request, sample=j, generators=[g],
                         num_prompt=s.num_prompt) for j, g in enumerate(s.generators[1:], 1)]
        for c in kids:
            self.bm.fork(s, c)
        s.generators = s.generators[:1]
        return [s] + kids
