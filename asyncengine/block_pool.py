"""The KV block pool: ref counts, an LRU queue of free blocks, and hash -> cached block.

It knows nothing of requests. A free block may still hold a cached prefix (its hash
stays registered) until it is taken for new data: that is eviction, and it happens
only to blocks nobody references, least recently freed first.
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


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first (eviction order).
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, Block] = {}
        # Prefix-cache counters (in tokens are counted by the manager; here in blocks).
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[Block]:
        """Take n free blocks (evicting their cached hashes) with ref_cnt 1."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
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
                del self._free[block.block_id]
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
                self._free[block.block_id] = block

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
