"""The picking functions, without a network: the hash ring with bounded loads, least load, the prefix key."""

from __future__ import annotations

import math
import random

import pytest

from kubellm.gateway.balance import Decision, Load, Ring, hash64, load_bound, pick_least, pick_prefix, prefix_key

REPLICAS = [f"pod-{i}" for i in range(5)]


def _chat(system: str, *turns: str) -> dict[str, object]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def test_walk_visits_every_replica_once_starting_at_the_owner() -> None:
    ring = Ring(REPLICAS)
    for key in range(50):
        order = list(ring.walk(hash64(str(key).encode())))
        assert sorted(order) == sorted(REPLICAS)
    assert list(Ring([]).walk(1)) == []


def test_same_prefix_same_replica_when_loads_allow() -> None:
    ring = Ring(REPLICAS)
    loads = {r: Load(in_flight=1) for r in REPLICAS}
    key = prefix_key("chat", _chat("You are terse.", "Hello, who are you?"))
    picks = {pick_prefix(ring, key, loads).replica for _ in range(20)}
    assert len(picks) == 1
    # A later turn of the same conversation has the same key, so it goes where its prefix is cached.
    later = prefix_key("chat", _chat("You are terse.", "Hello, who are you?", "A bot.", "Tell me more."))
    assert later == key
    assert pick_prefix(ring, later, loads).replica in picks


def test_the_ring_moves_few_keys_when_a_replica_goes() -> None:
    keys = [f"conversation-{i}".encode() for i in range(2000)]
    before, after = Ring(REPLICAS), Ring(REPLICAS[:-1])
    moved = sum(next(before.walk(hash64(k))) != next(after.walk(hash64(k))) for k in keys)
    owned_by_gone = sum(next(before.walk(hash64(k))) == REPLICAS[-1] for k in keys)
    assert moved == owned_by_gone  # only the keys of the removed replica move


@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_bounded_loads_no_replica_above_the_bound(factor: float) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    ring = Ring(REPLICAS)
    loads = {r: Load() for r in REPLICAS}
    hot = b"the same system prompt for everyone"
    for step in range(400):
        key = hot if rng.random() < 0.7 else f"k{rng.randrange(30)}".encode()
        pick = pick_prefix(ring, key, loads, factor)
        loads[pick.replica] = Load(in_flight=loads[pick.replica].in_flight + 1)
        total = sum(load.in_flight for load in loads.values())
        bound = math.ceil(factor * total / len(REPLICAS))
        assert max(load.in_flight for load in loads.values()) <= bound, (seed, step, loads)
        if rng.random() < 0.3:  # some requests finish
            done = rng.choice([r for r in REPLICAS if loads[r].in_flight] or REPLICAS)
            loads[done] = Load(in_flight=max(0, loads[done].in_flight - 1))


def test_an_owner_over_its_bound_spills_to_the_same_next_replica() -> None:
    ring = Ring(REPLICAS)
    key = b"sticky prefix"
    owner, second = list(ring.walk(hash64(key)))[:2]
    loads = {r: Load() for r in REPLICAS}
    loads[owner] = Load(in_flight=3)  # bound with 1.25: ceil(1.25 * 4 / 5) = 1
    assert load_bound(loads, REPLICAS, 1.25) == 1
    picks = [pick_prefix(ring, key, loads) for _ in range(3)]
    assert {p.replica for p in picks} == {second} and {p.decision for p in picks} == {Decision.SPILL}
    assert pick_prefix(ring, key, {r: Load() for r in REPLICAS}).decision is Decision.OWNER


def test_runtime_waiting_counts_as_load() -> None:
    ring = Ring(REPLICAS[:2])
    key = b"x"
    owner, other = list(ring.walk(hash64(key)))
    assert pick_prefix(ring, key, {owner: Load(waiting=6.0), other: Load()}).replica == other


def test_least_load_prefers_fewest_then_emptier_cache_then_rotates() -> None:
    loads = {"a": Load(in_flight=2), "b": Load(in_flight=1, waiting=1.0), "c": Load(in_flight=1)}
    assert pick_least(["a", "b", "c"], loads).replica == "c"
    loads = {"a": Load(in_flight=1, kv_usage=0.9), "b": Load(in_flight=1, kv_usage=0.2)}
    assert pick_least(["a", "b"], loads).replica == "b"
    assert {pick_least(["a", "b", "c"], {}, turn).replica for turn in range(3)} == {"a", "b", "c"}
    assert pick_least(["a"], {}).decision is Decision.LEAST_LOAD
    with pytest.raises(ValueError):
        pick_least([], {})


def test_prefix_keys() -> None:
    # chat: through the first user message; content parts count by their text.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant"}]}
    assert prefix_key("chat", parts) == b"user\nhi\n"
    assert prefix_key("chat", _chat("S", "u1")) != prefix_key("chat", _chat("S", "u2"))
    assert prefix_key("chat", {"messages": "nope"}) == b""
    # each message's text is cut at prefix_chars: a long system prompt shared by two sessions still leaves their
    # openings apart, and a 200 KB message is not hashed whole
    system, opening = "s" * 200_000, "u" * 200_000
    key = prefix_key("chat", _chat(system, opening + "1"), prefix_chars=1024)
    assert key == b"system\n" + b"s" * 1024 + b"\nuser\n" + b"u" * 1024 + b"\n"
    assert prefix_key("chat", _chat(system, "1" + opening)) != prefix_key("chat", _chat(system, "2" + opening))
    # completions: the leading characters (or token ids), the first prompt of a batch.
    assert prefix_key("completions", {"prompt": "abcdef"}, prefix_chars=3) == b"abc"
    assert prefix_key("completions", {"prompt": ["abcdef", "zzz"]}, prefix_chars=3) == b"abc"
    assert prefix_key("completions", {"prompt": [1, 2, 3, 4]}, prefix_chars=2) == b"1,2"
