"""BlockManager: the pool of paged KV-cache blocks, each sequence's block table, and automatic prefix caching.

Prefix caching: a block whose ``block_size`` tokens are all computed is registered under a chained hash of
(parent block's hash, its own tokens), so a block is only ever reused after the very same prefix. A lookup hit
also compares the stored (parent hash, tokens) with the query, so a hash collision cannot share wrong KV.
Blocks are reference counted; a freed block that carries a hash stays cached (still findable) on an LRU list and
is only evicted, oldest first, when a free block is needed and no never-cached block is left.

::

    block states:  in use (ref_count > 0) ──free──▶ cached-free (hash kept, LRU) ──evict──▶ plain free
                        ▲                               │ hit                                │ allocate
                        └───────────────────────────────┴────────────────────────────────────┘
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

_NO_PARENT = 0x5F3759DF  # the chain's root "hash"; any constant works


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained block hash. Python's hash of int tuples is deterministic across processes (no salt for ints)."""
    return hash((_NO_PARENT if parent_hash is None else parent_hash, token_ids))


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit

    def reset(self) -> None:
        self.block_hash = None
        self.parent_hash = None
        self.token_ids = None


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks that hold nothing worth keeping; popped first
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        # free blocks still registered in the prefix cache, least recently freed first
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- accounting -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence (cached-free blocks count as free)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` needs so that its table covers ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- prefix cache -------------------------------------------------------------------------------------
    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def token_block_hashes(self, seq: Sequence) -> list[int]:
        """The chained hashes of ``seq``'s full blocks of tokens, each computed once (extended as it grows)."""
        hashes, bs = seq.token_block_hashes, self.block_size
        for i in range(len(hashes), seq.num_tokens // bs):
            hashes.append(hash_block(hashes[i - 1] if i else None, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes

    def find_cached_prefix(self, token_ids: list[int], *, count: bool = True) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids`` in whole blocks, leaving at least the
        last token uncached (its logits must be computed). ``count`` adds the lookup to the hit-rate counters."""
        bs = self.block_size
        num_full = (len(token_ids) - 1) // bs
        hashes: list[int] = []
        if self.enable_prefix_caching:
            for i in range(num_full):
                hashes.append(hash_block(hashes[-1] if hashes else None, tuple(token_ids[i * bs : (i + 1) * bs])))
        hits = self._lookup(hashes, token_ids)
        if count:
            self.record_prefix_lookup(len(token_ids), len(hits) * bs)
        return hits

    def _lookup(self, hashes: list[int], token_ids: list[int]) -> list[int]:
        """The cached blocks of the leading ``hashes`` (those of ``token_ids``' blocks), up to the first miss."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i, h in enumerate(hashes):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                break  # a collision: same hash, different content
            hits.append(block_id)
            parent = h
        return hits

    def allocate_prefill(self, seq: Sequence, budget: int, *, use_prefix_cache: bool = True) -> int | None:
        """Admit a waiting sequence (empty block table): take its cached prefix blocks and blocks for up to
        ``budget`` more tokens. Returns the number of tokens to compute this step, or None (nothing taken) when
        the free blocks do not suffice. Its ``num_computed_tokens`` is then the cached prefix's length."""
        assert not seq.block_table, seq
        bs = self.block_size
        # the last token is never taken from the cache: its logits must be computed
        num_full = (seq.num_tokens - 1) // bs
        hits = self._lookup(self.token_block_hashes(seq)[:num_full], seq.token_ids) if use_prefix_cache else []
        num_computed = len(hits) * bs
        num_new = min(seq.num_tokens - num_computed, budget)
        num_blocks = -(-(num_computed + num_new) // bs) - len(hits)
        num_revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached-free blocks taken back
        if not self.can_allocate(num_blocks + num_revived):
            return None
        self.record_prefix_lookup(seq.num_tokens, num_computed)
        self.allocate_cached_prefix(seq, hits)
        allocated = self.allocate_slots(seq, num_computed + num_new)
        assert allocated, seq
        return num_new

    def allocate_cached_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give a sequence with an empty block table the cached blocks ``block_ids`` as its first blocks."""
        assert not seq.block_table, seq
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(block_ids)
        seq.num_computed_tokens = len(block_ids) * self.block_size

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full of computed tokens since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if seq.num_hashed_blocks >= num_full:
            return
        hashes = self.token_block_hashes(seq)
        while seq.num_hashed_blocks < num_full:
            i = seq.num_hashed_blocks
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and h not in self._cached:
                parent = hashes[i - 1] if i else None
                block.block_hash, block.parent_hash = h, parent
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._cached[h] = block.block_id
            seq.num_hashed_blocks += 1

    # ---- allocation ---------------------------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def _pop_free_block(self) -> Block:
        if self._free_plain:
            block = self.blocks[self._free_plain.pop()]
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            del self._cached[block.block_hash]  # type: ignore[arg-type]
            block.reset()
        else:
            raise NoFreeBlocksError("no free KV-cache block")
        block.ref_count = 1
        return block

    def allocate_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens. All or nothing: False if short of blocks."""
        needed = self.num_blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._pop_free_block().block_id)
        return True

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """After a verification step: the ``num_accepted`` drafts (now in ``token_ids``) keep their KV; the slots
        of the rejected ones are garbage, and blocks past the sequence's tokens go back (never hashed: the prefix
        cache only ever sees accepted tokens)."""
        seq.num_computed_tokens += num_accepted
        assert seq.num_computed_tokens < seq.num_tokens, seq
        self.register_computed_blocks(seq)
        keep = -(-seq.num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            assert block.ref_count == 0 and block.block_hash is None, block
            self._free_plain.append(block.block_id)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (last block first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, block
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain.append(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's full computed blocks with ``child`` (reference counted). The child recomputes
        its partial last block itself, so no block is ever written by two sequences."""
        assert not child.block_table, child
        num_shared = min(parent.num_computed_tokens // self.block_size, len(parent.block_table))
        for block_id in parent.block_table[:num_shared]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:num_shared]
        child.num_hashed_blocks = min(num_shared, parent.num_hashed_blocks)
        child.num_computed_tokens = num_shared * self.block_size

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's ``reset_prefix_cache``: benchmarks that replay a workload start cold).
        Only while no block is held, since a running sequence's hashed blocks are shared with later lookups: returns
        whether it was reset."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self._free_cached:
            self.blocks[block_id].reset()
            self._free_plain.append(block_id)
        self._free_cached.clear()
        self._cached.clear()
        return True

    def check_all_free(self) -> None:
        """Assert that no block is held (for tests and shutdown)."""
        held = [b.block_id for b in self.blocks if b.ref_count]
        if held or self.num_free_blocks != self.num_blocks:
            raise AssertionError(f"{len(held)} KV blocks still held: {held[:16]}")
