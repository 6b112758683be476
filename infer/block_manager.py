"""KV blocks' bookkeeping: ref counts, free list, prefix cache, copy-on-write (infer/README.md, "Prefix cache")."""

from collections import OrderedDict
from dataclasses import dataclass

from selfreward.infer.sequence import Sequence


@dataclass(slots=True)
class Block:
    id: int
    ref: int = 0
    key: int | None = None            # prefix-cache key when full and registered
    prev: int | None = None           # predecessor block's key (-1 for the first block)
    tokens: tuple[int, ...] = ()


def chain_key(prev: int, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cache: dict[int, int] = {}   # key -> block id
        self.prefix_cache = prefix_cache
        self.copies: list[tuple[int, int]] = []
        self.prefill_computed = self.prefill_hit = self.num_cow = 0   # statistics (prompt tokens), copies on write

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take_free(self) -> Block:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.key is not None and self.cache.get(b.key) == bid:
            del self.cache[b.key]
        b.key, b.prev, b.tokens, b.ref = None, None, (), 1
        return b

    def _hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks before seq.need_from, each hit checked token by token."""
        hits: list[int] = []
        bs, toks, prev = self.block_size, seq.token_ids, -1
        for i in range(seq.need_from // bs if self.prefix_cache else 0):   # positions to compute are never served
            tokens = tuple(toks[i * bs:(i + 1) * bs])
            bid = self.cache.get(chain_key(prev, tokens))
            if bid is None or (self.blocks[bid].tokens, self.blocks[bid].prev) != (tokens, prev):
                break
            hits.append(bid)
            prev = self.blocks[bid].key
        return hits

    def allocate(self, seq: Sequence, budget: int | None = None) -> bool:
        """Blocks for all of seq's tokens, cached full blocks of its prefix reused; seq.chunk: the uncached tokens
        its first prefill step computes (at most `budget`). False (nothing changed): the free list is too short."""
        assert not seq.block_table
        bs, toks = self.block_size, seq.token_ids
        n = -(-len(toks) // bs)             # blocks for all its tokens
        hits = self._hits(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref == 0)
        if n - len(hits) > self.num_free - reused_free:
            return False
        for bid in hits:
            b = self.blocks[bid]
            if b.ref == 0:
                del self.free[bid]
            b.ref += 1
        seq.block_table = hits + [self._take_free().id for _ in range(n - len(hits))]
        seq.num_keyed = len(hits)
        seq.num_cached = len(hits) * bs
        todo = len(toks) - seq.num_cached
        seq.chunk = todo if budget is None else min(todo, budget)
        self.computing(seq, seq.num_cached + seq.chunk)
        self.prefill_hit += seq.num_cached
        self.prefill_computed += len(toks) - seq.num_cached
        return True

    def computing(self, seq: Sequence, upto: int) -> None:
        """The step being scheduled computes seq's tokens below position `upto`: key the full blocks below it
        (infer/README.md, "Prefix cache": why at scheduling, and not before)."""
        bs, toks = self.block_size, seq.token_ids
        i = seq.num_keyed
        prev = -1 if i == 0 else self.blocks[seq.block_table[i - 1]].key
        while (i + 1) * bs <= min(upto, len(toks)):
            b, tokens = self.blocks[seq.block_table[i]], tuple(toks[i * bs:(i + 1) * bs])
            b.key, b.prev, b.tokens = chain_key(prev, tokens), prev, tokens
            if self.prefix_cache and b.key not in self.cache:
                self.cache[b.key] = b.id
            prev = b.key
            i += 1
        seq.num_keyed = i

    def free_seq(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref -= 1
            assert b.ref >= 0, f"block {bid} freed twice"
            if b.ref == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_cached = seq.num_keyed = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (its KV is the same prompt)."""
        for bid in parent.block_table:
            self.blocks[bid].ref += 1
        child.block_table = list(parent.block_table)
        child.num_cached, child.num_keyed = parent.num_cached, parent.num_keyed

    def can_append(self, seq: Sequence) -> bool:
        bi = (len(seq) - 1) // self.block_size
        return self.num_free > 0 or (bi < len(seq.block_table) and self.blocks[seq.block_table[bi]].ref == 1)

    def append(self, seq: Sequence) -> None:
        """Room for the K/V of seq's newest token: a fresh block at a boundary, or a private copy of a shared
        partial block (copy-on-write). Call can_append first."""
        bi = (len(seq) - 1) // self.block_size
        if bi == len(seq.block_table):
            seq.block_table.append(self._take_free().id)
            return
        assert bi == len(seq.block_table) - 1, "appending behind the cache"
        old = self.blocks[seq.block_table[bi]]
        if old.ref > 1:                    # copy on write
            new = self._take_free()
            old.ref -= 1
            self.copies.append((old.id, new.id))
            self.num_cow += 1
            seq.block_table[bi] = new.id

    def take_copies(self) -> list[tuple[int, int]]:
        c, self.copies = self.copies, []
        return c
