"""Maps requests to KV blocks: allocation, freeing, and prefix-cache lookups by chained hash.

A full block's hash covers (its parent's hash, a salt, its token ids). The salt carries
the weight version the KV was computed with, so KV from older weights can never be
matched by a request admitted after an update. A request's `cache_salt` replaces the
root of its chain, so only requests with the same cache_salt share blocks.
"""
from __future__ import annotations

import hashlib
from array import array

from asyncengine.block_pool import Block, BlockHash, BlockPool
from asyncengine.request import Request


def hash_block(
    parent: BlockHash | None, salt: int, token_ids: list[int], cache_salt: str | None = None
) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    # A tag byte first, so a salted root can never read as a parent hash or the plain root.
    if parent is not None:
        h.update(b"p" + parent)
    else:
        h.update(b"root" if cache_salt is None else b"s" + cache_salt.encode())
    h.update(salt.to_bytes(8, "little", signed=True))
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[Block]] = {}
        # request_id -> (salt, hashes of its full blocks so far)
        self._hashes: dict[str, tuple[int, list[BlockHash]]] = {}
        # request_id -> number of its blocks already registered in the prefix cache
        self._num_registered: dict[str, int] = {}
        # Session pins: owner -> the request whose blocks it pins once they are freed,
        # and owner -> the (block, generation) pairs it pins now.
        self._pin_request: dict[str, str] = {}
        self._pin_owner: dict[str, str] = {}  # the reverse: request_id -> owner
        self._pins: dict[str, list[tuple[Block, int]]] = {}
        # Prefix-cache counters, in tokens, over admissions.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request, salt: int) -> list[Block]:
        """Longest cached prefix of full blocks; at least one token is left to compute
        (its logits are needed). Not used for requests that want prompt logprobs."""
        if not self.pool.enable_caching or request.wants_prompt_logprobs:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for block_hash in self._block_hashes(request, salt, max_blocks):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.num_query_tokens += request.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, computed: list[Block] | None = None) -> bool:
        """Make room for num_new_tokens more tokens after the computed ones.

        `computed` are prefix-cache hits of a request being admitted. Returns False (and
        changes nothing) when the pool cannot supply the blocks.
        """
        computed = computed or []
        held = self._blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        need = self.num_blocks_needed(num_computed + num_new_tokens) - len(held) - len(computed)
        # Hits on free blocks leave the free queue too.
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimed:
            return False
        self.pool.touch(computed)
        new = self.pool.allocate(max(need, 0))
        self._blocks[request.request_id] = held + computed + new
        if computed:
            self._num_registered[request.request_id] = len(computed)
        return True

    def cache_full_blocks(self, request: Request, salt: int) -> None:
        """Register the request's newly completed blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        rid = request.request_id
        full = request.num_computed_tokens // self.block_size
        done = self._num_registered.get(rid, 0)
        if full <= done:
            return
        blocks = self._blocks[rid]
        hashes = self._block_hashes(request, salt, full)
        for i in range(done, full):
            self.pool.cache(blocks[i], hashes[i])
        self._num_registered[rid] = full

    def free(self, request: Request) -> None:
        blocks = self._blocks.pop(request.request_id, [])
        owner = self._pin_owner.get(request.request_id)
        if owner is not None:  # before the free, so pinned blocks join the protected queue
            self._repin(owner, blocks)
        self.pool.free(list(reversed(blocks)))
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def pin_request(self, request_id: str, owner: str) -> None:
        """When request_id's blocks are freed (finish or preemption), `owner` (a live
        session) pins their cached ones instead of what it pinned before, so they are
        evicted last. The request may not be admitted yet."""
        self._pin_owner.pop(self._pin_request.get(owner, ""), None)
        self._pin_request[owner] = request_id
        self._pin_owner[request_id] = owner

    def unpin(self, owner: str) -> None:
        """The session ended: drop its pins and its pending request pin."""
        self._pin_owner.pop(self._pin_request.pop(owner, ""), None)
        self._repin(owner, [])
        self._pins.pop(owner, None)

    def _repin(self, owner: str, blocks: list[Block]) -> None:
        new = [(b, b.generation) for b in blocks if b.block_hash is not None]
        for block, _ in new:  # pin first: blocks in both sets never pass through zero
            self.pool.pin(block)
        for block, generation in self._pins.get(owner, []):
            if block.generation == generation:  # else evicted since: the pin went with it
                self.pool.unpin(block)
        self._pins[owner] = new

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        self._pins.clear()  # the pool dropped every pin with the hashes
        # Running requests re-register their blocks under a fresh chain on next fill.
        self._num_registered = {rid: 0 for rid in self._num_registered}
        self._hashes.clear()

    def _block_hashes(self, request: Request, salt: int, n: int) -> list[BlockHash]:
        """Hashes of the request's first n full blocks (memoized per request and salt)."""
        rid = request.request_id
        memo_salt, hashes = self._hashes.get(rid, (salt, []))
        if memo_salt != salt:
            hashes = []
        tokens, bs, cache_salt = request.all_token_ids, self.block_size, request.params.cache_salt
        while len(hashes) < n:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, salt, tokens[i * bs : (i + 1) * bs], cache_salt))
        self._hashes[rid] = (salt, hashes)
        return hashes
