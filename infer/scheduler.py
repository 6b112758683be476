"""Which sequences run in the next step: waiting and running queues, continuous batching, a per-step
token budget, preemption by recompute.

A step is either a prefill (new or preempted sequences, all their uncached tokens) or a decode (one new
token for every running sequence). Waiting sequences are admitted whenever slots, blocks and the token
budget allow, so a finished sequence's place is taken at the next step. When a decode step cannot get a
block, the most recently admitted sequence is preempted: its blocks are freed and it goes back to the
front of the waiting queue with all its tokens, to be prefilled again later (its random generator keeps
its state, so the sample it produces is the one an unpressured run produces).
"""
from __future__ import annotations

from collections import deque

from selfreward.infer.block_manager import BlockManager
from selfreward.infer.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (sequences of this step, is_prefill)."""
        batch: list[Sequence] = []
        n_running = len(self.running)
        tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            if n_running + seq.n_forks > self.max_num_seqs and (batch or self.running):
                break
            todo = len(seq) - self.bm.cached_prefix_len(seq)
            if tokens + todo > self.max_num_batched_tokens and batch:
                break   # a prompt longer than the budget still runs, alone
            if not self.bm.allocate(seq):
                if not batch and not self.running:
                    raise RuntimeError(f"a sequence of {len(seq)} tokens does not fit in the KV pool "
                                       f"({len(self.bm.blocks)} blocks of {self.bm.block_size}); raise num_blocks")
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            n_running += seq.n_forks
            tokens += len(seq) - seq.num_cached
        if batch:
            return batch, True

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
        return kept, False

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def start(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences (and their forks) join the running queue."""
        self.running.extend(seqs)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.bm.free_seq(seq)

    def drop_finished(self) -> None:
        if any(s.status is Status.FINISHED for s in self.running):
            self.running = deque(s for s in self.running if s.status is not Status.FINISHED)
