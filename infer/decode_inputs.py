"""The decode step's input tensors, updated in place while the batch is the previous decode step's, else rebuilt
from the sequences' lists (infer/README.md, "Decode step tensors").
"""
from __future__ import annotations

import torch

from selfreward.infer.sequence import Sequence


def block_tables(seqs: list[Sequence], width: int, device) -> torch.Tensor:
    """The sequences' block tables as an int32 [B, width] tensor, zero-padded."""
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32,
                        device=device)


class DecodeInputs:
    def __init__(self, block_size: int, max_blocks: int, device: torch.device):
        self.bs, self.max_blocks, self.device = block_size, max_blocks, device
        self.ids: list[int] = []              # seq_id of each row of the current tensors
        self.next_tokens: torch.Tensor | None = None   # [B] sampled at the last step, in row order
        self.rebuilds = 0                     # how often the tensors were built from lists (statistics, tests)
        self.tokens = self.pos = self.lens = self.bt = self.slots = self.cu = None
        self._nb: list[int] = []              # per row: block-table entries written, and the last one
        self._last: list[int] = []

    def update(self, seqs: list[Sequence]) -> "DecodeInputs":
        """Tensors for a decode step of `seqs` (each has its newest token to run) -> self, with
        tokens [B] long, pos [B] long, lens [B] int32, bt [B, width] int32, slots [B] long, cu [B+1] int32."""
        ids = [s.seq_id for s in seqs]
        if not (ids == self.ids and self._advance(seqs)):
            self._rebuild(seqs, ids)
        self.next_tokens = None
        bs = self.bs
        self.slots = self.bt.gather(1, (self.pos // bs)[:, None])[:, 0].long() * bs + self.pos % bs
        return self

    def _advance(self, seqs: list[Sequence]) -> bool:
        """In place: one more token per row. False if the tensors cannot follow (table too narrow, or no
        sampled ids to take)."""
        if self.next_tokens is None or self.next_tokens.shape[0] != len(seqs):
            return False
        rows: list[int] = []
        cols: list[int] = []
        vals: list[int] = []
        width = self.bt.shape[1]
        for i, s in enumerate(seqs):
            table = s.block_table
            n = len(table)
            if n != self._nb[i] or table[-1] != self._last[i]:
                if n > width:
                    return False
                for j in range(self._nb[i] - 1, n):    # the old last entry (copy-on-write) and new ones
                    rows.append(i), cols.append(j), vals.append(table[j])
                self._nb[i], self._last[i] = n, table[-1]
        if rows:
            dev = self.device
            self.bt[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = \
                torch.tensor(vals, dtype=torch.int32, device=dev)
        self.tokens = self.next_tokens
        self.lens += 1
        self.pos += 1
        return True

    def _rebuild(self, seqs: list[Sequence], ids: list[int]) -> None:
        dev, B = self.device, len(seqs)
        need = max(len(s.block_table) for s in seqs)
        self.bt = block_tables(seqs, min(self.max_blocks, max(2 * need, need + 16)), dev)   # room to grow
        self.tokens = torch.tensor([s.token_ids[-1] for s in seqs], device=dev)
        self.lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32, device=dev)
        self.pos = self.lens.long() - 1
        if self.cu is None or self.cu.shape[0] != B + 1:
            self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.ids = ids
        self._nb = [len(s.block_table) for s in seqs]
        self._last = [s.block_table[-1] for s in seqs]
        self.rebuilds += 1
