"""The decode step replayed from CUDA graphs per batch-size bucket (infer/README.md); the CPU never imports it."""

import torch

from selfreward.model.llama import AttnContext


def buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... up to max_batch (and max_batch itself)."""
    out = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    return out if out[-1] == max_batch else out + [max_batch]


def bucket_for(sizes: list[int], B: int) -> int | None:
    """The smallest captured size >= B (None: larger than every bucket, run eagerly)."""
    return next((b for b in sizes if b >= B), None)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.sizes = buckets(max_batch)
        dev, M, W = runner.device, self.sizes[-1], runner.dec.max_blocks
        self.tokens = torch.zeros(M, dtype=torch.long, device=dev)
        self.pos = torch.zeros(M, dtype=torch.long, device=dev)
        self.slots = torch.full((M,), -1, dtype=torch.long, device=dev)
        self.lens = torch.ones(M, dtype=torch.int32, device=dev)
        self.bt = torch.zeros(M, W, dtype=torch.int32, device=dev)
        self.cu = torch.arange(M + 1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(M, runner.model.cfg.hidden_size, dtype=runner.dtype, device=dev)   # static output
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        ctx = AttnContext(cu_seqlens=self.cu[:b + 1], max_seqlen=1, kv_caches=self.runner.kv_caches,
                          slot_mapping=self.slots[:b], block_tables=self.bt[:b], context_lens=self.lens[:b],
                          decode=True)
        return self.runner.model(self.tokens[:b], self.pos[:b], ctx)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.sizes):          # largest first: the smaller graphs reuse its pool
            self._forward(b)                    # warm-up: Triton compiles, allocator settles
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.hidden[:b] = self._forward(b)
            pool = g.pool() if pool is None else pool
            self.graphs[b] = g
        torch.cuda.synchronize()

    @torch.inference_mode()
    def replay(self, d) -> torch.Tensor:
        """d: the step's DecodeInputs -> hidden [B, H], a view of the static output (used before the next replay)."""
        B = d.tokens.shape[0]
        b = bucket_for(self.sizes, B)
        for buf, src in ((self.tokens, d.tokens), (self.pos, d.pos), (self.slots, d.slots), (self.lens, d.lens)):
            buf[:B].copy_(src)
        self.bt[:B, :d.bt.shape[1]].copy_(d.bt)
        for buf, pad in ((self.slots, -1), (self.lens, 1), (self.bt, 0), (self.tokens, 0), (self.pos, 0)):
            buf[B:b].fill_(pad)                 # padding rows: store nothing, read one finite slot
        self.graphs[b].replay()
        return self.hidden[:B]
