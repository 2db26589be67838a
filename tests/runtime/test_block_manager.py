"""BlockManager: allocation, reference counts, the prefix cache's hash chain, LRU eviction, collision safety."""

from __future__ import annotations

import itertools

import pytest

from kubellm.runtime.engine import block_manager as bm_module
from kubellm.runtime.engine.block_manager import BlockManager, hash_block
from kubellm.runtime.engine.sequence import Request, Sequence
from kubellm.runtime.outputs import RequestMetrics
from kubellm.runtime.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()


def make_seq(tokens: list[int]) -> Sequence:
    request = Request(f"r{next(_ids)}", list(tokens), SamplingParams(), 0, next(_ids), RequestMetrics(0.0))
    seq = Sequence(next(_ids), request, 0, list(tokens), len(tokens))
    request.seqs.append(seq)
    return seq


def run_prefill(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit ``seq`` as the scheduler does: cached prefix, then fresh blocks for the rest; mark all computed."""
    hits = bm.find_cached_prefix(seq.token_ids)
    bm.allocate_cached_prefix(seq, hits)
    assert bm.allocate_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed_blocks(seq)
    return hits


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(10)))  # 3 blocks
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    assert bm.allocate_slots(seq, 12)  # still 3 blocks
    assert len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 13)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    bm.check_all_free()


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(3, BS)
    a = make_seq(list(range(8)))
    assert bm.allocate_slots(a, 8)
    b = make_seq(list(range(100, 108)))
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    h1 = hash_block(None, (1, 2, 3, 4))
    assert hash_block(h1, (5, 6, 7, 8)) != hash_block(hash_block(None, (9, 9, 9, 9)), (5, 6, 7, 8))
    assert hash_block(None, (1, 2, 3, 4)) == h1  # deterministic


def test_prefix_hit_shares_blocks_with_reference_counts() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    run_prefill(bm, a)
    b = make_seq([*range(8), 50, 51, 52])  # shares the two full blocks
    hits = run_prefill(bm, b)
    assert hits == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 10 + 11
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1]
    bm.free(b)
    bm.check_all_free()


def test_a_different_prefix_does_not_hit() -> None:
    bm = BlockManager(16, BS)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second block, different first block: the chain must not match the second block
    assert bm.find_cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []


def test_the_last_token_is_never_served_from_the_cache() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(8)))  # exactly two full blocks
    run_prefill(bm, a)
    # an identical prompt must still compute its last token: only the first block can be reused
    assert len(bm.find_cached_prefix(list(range(8)))) == 1
    assert len(bm.find_cached_prefix(list(range(9)))) == 2


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first() -> None:
    bm = BlockManager(4, BS)
    a = make_seq(list(range(9)))  # 3 blocks, 2 full and hashed
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    # still findable after the free
    assert len(bm.find_cached_prefix(list(range(9)))) == 2
    # allocating takes never-cached blocks first: 2 plain blocks (the partial one of `a` and the untouched one)
    c = make_seq(list(range(100, 108)))
    assert bm.allocate_slots(c, 8)
    assert len(bm.find_cached_prefix(list(range(9)))) == 2
    # one more block must evict: `a` freed its tail first, so its second block goes before its first
    d = make_seq(list(range(200, 204)))
    assert bm.allocate_slots(d, 4)
    assert len(bm.find_cached_prefix(list(range(9)))) == 1
    e = make_seq(list(range(300, 304)))
    assert bm.allocate_slots(e, 4)
    assert bm.find_cached_prefix(list(range(9))) == []
    assert not bm.allocate_slots(make_seq([1]), 1)


def test_a_hit_on_a_free_cached_block_revives_it() -> None:
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    shared = a.block_table[:2]
    bm.free(a)
    b = make_seq(list(range(9)))
    assert run_prefill(bm, b) == shared
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1]
    assert bm.num_used_blocks == 3
    bm.free(b)
    bm.check_all_free()


def test_hash_collision_is_caught_by_comparing_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(8, BS)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5]))
    assert bm.find_cached_prefix([9, 9, 9, 9, 5]) == []
    assert len(bm.find_cached_prefix([1, 2, 3, 4, 5])) == 1


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, make_seq(list(range(9))))
    assert bm.find_cached_prefix(list(range(9))) == []
    assert bm.prefix_cache_hits == 0


def test_fork_shares_full_blocks_only() -> None:
    bm = BlockManager(8, BS)
    parent = make_seq(list(range(10)))
    run_prefill(bm, parent)
    child = make_seq(list(range(10)))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2]
    assert child.num_computed_tokens == 8  # it recomputes the partial last block itself
    assert [bm.blocks[i].ref_count for i in child.block_table] == [2, 2]
    assert bm.allocate_slots(child, 11)
    assert child.block_table[2] not in parent.block_table
    bm.free(parent)
    bm.free(child)
    bm.check_all_free()


def test_reset_prefix_cache_forgets_cached_prefixes_only_when_nothing_is_held() -> None:
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))  # two full, hashed blocks
    run_prefill(bm, a)
    assert not bm.reset_prefix_cache()  # a's blocks are held
    assert len(bm.find_cached_prefix(list(range(9)))) == 2
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.find_cached_prefix(list(range(9))) == []
    bm.check_all_free()
    b = make_seq(list(range(9)))
    assert run_prefill(bm, b) == [] and len(b.block_table) == 3  # the forgotten blocks serve as plain ones
    bm.free(b)
    bm.check_all_free()
