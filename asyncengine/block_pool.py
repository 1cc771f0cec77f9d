"""The KV block pool: ref counts, an LRU queue of free blocks, and hash -> cached block.

It knows nothing of requests. A free block may still hold a cached prefix (its hash
stays registered) until it is taken for new data: that is eviction, and it happens
only to blocks nobody references, least recently freed first.

Pinned blocks (a live session's history, see `KVCacheManager.pin_request`) wait in a
second free queue that is evicted only once the ordinary one is empty. At most
`protected_cap` blocks wait there; past it the oldest drops into the ordinary queue.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockHash = bytes


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than were asked for."""


@dataclass(slots=True)
class Block:
    block_id: int
    # Requests using this block; 0 means it sits in the free queue.
    ref_cnt: int = 0
    # Hash of the full token block (chained over its prefix); None until it is full.
    block_hash: BlockHash | None = None
    # Live sessions whose history holds this block (free + pinned = evicted last).
    pins: int = 0
    # Times the block was taken for new data (a pin names one generation of its data).
    generation: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, protected_cap: int = 0) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.protected_cap = protected_cap
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first (eviction order).
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        # Free pinned blocks, evicted only when _free is empty (at most protected_cap).
        self._protected: OrderedDict[int, Block] = OrderedDict()
        self._cached: dict[BlockHash, Block] = {}
        # Prefix-cache counters (in tokens are counted by the manager; here in blocks).
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._protected)

    @property
    def num_protected_blocks(self) -> int:
        return len(self._protected)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[Block]:
        """Take n free blocks (evicting their cached hashes) with ref_cnt 1: ordinary free
        blocks first, then pinned ones, least recently freed first in each."""
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            _, block = (self._free if self._free else self._protected).popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.pins = 0  # its pinners' records go stale: they check the generation
            block.generation += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: BlockHash) -> Block | None:
        """The cached block with this hash, if any (not yet referenced by the caller)."""
        return self._cached.get(block_hash)

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cache hits; a hit on a free block takes it out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._unqueue(block)
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop a reference; unreferenced blocks go to the back of the eviction queue.

        Callers pass a request's blocks in reverse so that a prefix's tail is evicted
        before its head (the head is more likely shared).
        """
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._enqueue(block)

    def pin(self, block: Block) -> None:
        """One more live session holds this cached block: if free, it is evicted last."""
        block.pins += 1
        if block.pins == 1 and block.ref_cnt == 0 and self.protected_cap > 0:
            self._unqueue(block)
            self._enqueue(block)

    def unpin(self, block: Block) -> None:
        """A session let go; an unpinned free block goes to the front of the eviction queue."""
        if block.pins == 0:
            return
        block.pins -= 1
        if block.pins == 0 and block.block_id in self._protected:
            del self._protected[block.block_id]
            self._free[block.block_id] = block
            self._free.move_to_end(block.block_id, last=False)

    def _enqueue(self, block: Block) -> None:
        """A block nobody references joins the back of its free queue (pinned: the
        protected one, whose oldest block drops to the ordinary queue past the cap)."""
        if block.pins == 0:
            self._free[block.block_id] = block
            return
        self._protected[block.block_id] = block
        while len(self._protected) > self.protected_cap:
            _, oldest = self._protected.popitem(last=False)
            self._free[oldest.block_id] = oldest

    def _unqueue(self, block: Block) -> None:
        if self._free.pop(block.block_id, None) is None:
            del self._protected[block.block_id]

    def cache(self, block: Block, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; blocks in use keep their data but will not be shared."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        for block in self.blocks:  # pins name cached prefixes, which are gone
            block.pins = 0
        self._free.update(self._protected)
        self._protected.clear()
