"""The KV pool and the model call: a step's flat tensors -> the paged forward (infer/README.md, "KV pool")."""

from itertools import accumulate

import torch
import torch.distributed as dist

from selfreward.model.llama import AttnContext, Transformer
from selfreward.infer.sequence import Sequence

DEFAULT_KV_BYTES = 2 * 1024**3   # CPU default pool size when num_blocks is not given
LAZY_ZERO_BYTES = 64 * 1024**2   # a CPU pool this large is torch.empty (infer/README.md, "KV pool")


def default_num_blocks(model: Transformer, block_size: int, max_num_seqs: int) -> int:
    """Enough for max_num_seqs full-length sequences, capped by a memory budget (half the free memory
    on CUDA, DEFAULT_KV_BYTES on CPU); the least over a tensor-parallel group, whose ranks must schedule alike."""
    p, c = next(model.parameters()), model.cfg
    per = 2 * c.num_hidden_layers * block_size * model.layers[0].attention.nkv * c.head_dim * p.element_size()
    budget = torch.cuda.mem_get_info(p.device)[0] // 2 if p.is_cuda else DEFAULT_KV_BYTES
    want = max_num_seqs * -(-c.max_position_embeddings // block_size)
    n = max(1, min(want, budget // per))
    if hasattr(model, "tp"):            # a tensor-parallel shard (parallel.tp_model)
        n = torch.tensor([n], device=p.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=model.tp.group)
    return int(n)


def _pool(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero KV pool; a large CPU one is torch.empty: the kernel zeroes its pages on first touch."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and nbytes >= LAZY_ZERO_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def block_tables(seqs: list[Sequence], width: int, device) -> torch.Tensor:
    """The sequences' block tables as an int32 [B, width] tensor, zero-padded."""
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32,
                        device=device)


def shared_blocks(seqs: list[Sequence], block_size: int) -> int:
    """How many leading block-table entries all of `seqs` (two or more) have in common, counting only blocks
    wholly before every row's newest token: those never change while the rows decode (appends and copies on
    write touch a row's last block only), so the count holds until the rows change."""
    if len(seqs) < 2:
        return 0
    first, limit = seqs[0].block_table, min((len(s) - 1) // block_size for s in seqs)
    n = 0
    while n < limit and all(s.block_table[n] == first[n] for s in seqs):
        n += 1
    return n


class DecodeInputs:
    def __init__(self, block_size: int, max_blocks: int, device: torch.device):
        self.bs, self.max_blocks, self.device = block_size, max_blocks, device
        self.ids: list[int] = []              # seq_id of each row of the current tensors
        self.next_tokens: torch.Tensor | None = None   # [B] sampled at the last step, in row order
        self.rebuilds = 0                     # how often the tensors were built from lists (statistics, tests)
        self.tokens = self.pos = self.lens = self.bt = self.slots = self.cu = None
        self.shared = 0                       # leading blocks every row shares (kernels/paged.py: cascade)
        self._nb, self._last = [], []         # per row: block-table entries written, and the last one

    def update(self, seqs: list[Sequence]) -> "DecodeInputs":
        """Tensors for a decode step of `seqs` (each has its newest token to run) -> self, with
        tokens [B] long, pos [B] long, lens [B] int32, bt [B, width] int32, slots [B] long, cu [B+1] int32."""
        ids = [s.seq_id for s in seqs]
        if not (ids == self.ids and self._advance(seqs)):
            self._rebuild(seqs, ids)
        self.next_tokens = None
        self.slots = self.bt.gather(1, (self.pos // self.bs)[:, None])[:, 0].long() * self.bs + self.pos % self.bs
        return self

    def _advance(self, seqs: list[Sequence]) -> bool:
        """In place: one more token per row; False if the tensors cannot follow (table too narrow, no sampled ids)."""
        if self.next_tokens is None or self.next_tokens.shape[0] != len(seqs):
            return False
        rows, cols, vals = [], [], []
        for i, s in enumerate(seqs):
            table = s.block_table
            n = len(table)
            if n != self._nb[i] or table[-1] != self._last[i]:
                if n > self.bt.shape[1]:
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
        self.shared = shared_blocks(seqs, self.bs)
        self._nb = [len(s.block_table) for s in seqs]
        self._last = [s.block_table[-1] for s in seqs]
        self.rebuilds += 1


class Runner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cuda_graphs: bool = False,
                 max_batch: int = 256):
        self.model, self.block_size = model, block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = model.cfg
        shape = (num_blocks, block_size, model.layers[0].attention.nkv, c.head_dim)   # this rank's KV heads
        self.kv_caches = [(_pool(shape, self.dtype, self.device), _pool(shape, self.dtype, self.device))
                          for _ in range(c.num_hidden_layers)]
        self.dec = DecodeInputs(block_size, -(-c.max_position_embeddings // block_size), self.device)
        self.graphs = None
        if cuda_graphs:   # infer/cuda_graphs.py: imported only when asked for, never on the CPU
            from selfreward.infer.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self, max_batch)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src, dst = torch.tensor(copies, device=self.device).T   # copies: (source, destination) block pairs
        for k, v in self.kv_caches:
            k[dst], v[dst] = k[src], v[src]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """Each sequence's next `chunk` tokens from num_cached on -> (hidden [N, H], each one's first row): the
        token at position p of seqs[i] is row starts[i] + p - seqs[i].num_cached."""
        dev, bs = self.device, self.block_size
        flat = [t for s in seqs for t in s.token_ids[s.num_cached:s.num_cached + s.chunk]]
        starts = [0, *accumulate(s.chunk for s in seqs)][:-1]
        N, S = len(flat), len(seqs)
        qlens = torch.tensor([s.chunk for s in seqs], device=dev)
        cached = torch.tensor([s.num_cached for s in seqs], device=dev)
        cu = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        cu[1:] = qlens.cumsum(0)
        seq_idx = torch.repeat_interleave(torch.arange(S, device=dev), qlens)
        pos = torch.arange(N, device=dev) - cu[:-1].long()[seq_idx] + cached[seq_idx]
        bt = block_tables(seqs, max(len(s.block_table) for s in seqs), dev)
        slots = bt[seq_idx, pos // bs].long() * bs + pos % bs
        ctx = AttnContext(cu_seqlens=cu, max_seqlen=int(qlens.max()), kv_caches=self.kv_caches,
                          slot_mapping=slots, block_tables=bt, context_lens=(cached + qlens).to(torch.int32),
                          decode=False)
        h = self.model(torch.tensor(flat, device=dev), pos, ctx)
        return h, starts

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token (each sequence's last) per sequence -> hidden [B, H]."""
        d = self.dec.update(seqs)
        if self.graphs is not None and len(seqs) <= self.graphs.sizes[-1]:
            return self.graphs.replay(d)
        ctx = AttnContext(cu_seqlens=d.cu, max_seqlen=1, kv_caches=self.kv_caches, slot_mapping=d.slots,
                          block_tables=d.bt, context_lens=d.lens, decode=True, shared_blocks=d.shared)
        return self.model(d.tokens, d.pos, ctx)
