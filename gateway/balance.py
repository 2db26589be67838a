"""Pick a replica of one model: consistent hashing with bounded loads over the request's prefix, or least load.

Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): each replica sits on a hash ring
at VNODES points; a key goes to the first replica clockwise whose load, with this request, stays within

    bound = ceil(c * (total_load + 1) / n_replicas)

so no replica ever takes more than c times the mean load, and a key leaves its owner (the replica whose prefix
cache has it) only while that owner is over the bound; it then spills to the next replica clockwise, the same
one every time. Load is the gateway's own in-flight count plus the waiting requests the runtime reports.

Everything here is pure: no network, no clock.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

VNODES = 64
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_PREFIX_CHARS = 1024


class Strategy(Enum):
    PREFIX_HASH = "PrefixHash"
    LEAST_LOAD = "LeastLoad"


class Decision(Enum):
    OWNER = "owner"  # PrefixHash: the key's owner on the ring
    SPILL = "spill"  # PrefixHash: the owner was over its bound; the next replica clockwise within it
    UNBOUNDED = "unbounded"  # PrefixHash: none within the bound (fractional runtime loads): the least loaded
    LEAST_LOAD = "least_load"


@dataclass(frozen=True)
class Load:
    """One replica's load as the gateway sees it."""

    in_flight: int = 0  # requests this gateway has sent it and not finished
    waiting: float = 0.0  # vllm:num_requests_waiting, last scrape
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, last scrape (0..1)

    @property
    def total(self) -> float:
        return self.in_flight + self.waiting


@dataclass(frozen=True)
class Pick:
    replica: str
    decision: Decision


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """The hash ring of a set of replicas (by their stable ids: pod names)."""

    def __init__(self, replicas: Sequence[str], vnodes: int = VNODES) -> None:
        self.replicas = tuple(sorted(set(replicas)))
        points = sorted((hash64(f"{r}#{i}".encode()), r) for r in self.replicas for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [r for _, r in points]

    def walk(self, key_hash: int) -> Iterator[str]:
        """Distinct replicas clockwise from the key's position; the first is its owner."""
        if not self._owners:
            return
        start = bisect.bisect_left(self._hashes, key_hash)
        seen: set[str] = set()
        for i in range(len(self._owners)):
            replica = self._owners[(start + i) % len(self._owners)]
            if replica not in seen:
                seen.add(replica)
                yield replica
                if len(seen) == len(self.replicas):
                    return


def load_bound(loads: Mapping[str, Load], replicas: Sequence[str], factor: float) -> int:
    """The most load one replica may carry once this request is added."""
    total = sum(loads.get(r, Load()).total for r in replicas)
    return math.ceil(factor * (total + 1) / max(len(replicas), 1))


def pick_prefix(ring: Ring, key: bytes, loads: Mapping[str, Load], factor: float = DEFAULT_LOAD_FACTOR) -> Pick:
    if not ring.replicas:
        raise ValueError("no replica to pick from")
    bound = load_bound(loads, ring.replicas, factor)
    for i, replica in enumerate(ring.walk(hash64(key))):
        if loads.get(replica, Load()).total + 1 <= bound:
            return Pick(replica, Decision.OWNER if i == 0 else Decision.SPILL)
    return Pick(pick_least(ring.replicas, loads).replica, Decision.UNBOUNDED)


def pick_least(replicas: Sequence[str], loads: Mapping[str, Load], turn: int = 0) -> Pick:
    """Fewest in-flight + waiting, then the emptier KV cache; ties rotate with `turn` (a request counter)."""
    if not replicas:
        raise ValueError("no replica to pick from")
    ordered = sorted(replicas)
    rotated = ordered[turn % len(ordered) :] + ordered[: turn % len(ordered)]
    best = min(rotated, key=lambda r: (loads.get(r, Load()).total, loads.get(r, Load()).kv_usage))
    return Pick(best, Decision.LEAST_LOAD)


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prefix_key(route: str, body: Mapping[str, Any], prefix_chars: int = DEFAULT_PREFIX_CHARS) -> bytes:
    """What a request shares with the earlier requests whose KV blocks a replica may still hold.

    chat: the leading messages rendered as `role\\ncontent\\n`, through the first user message: the system prompt
    and the conversation's opening, which every later turn of that conversation repeats (so a conversation sticks
    to one replica while sessions that share only the system prompt spread out); each message's text cut at its
    first `prefix_chars` characters, so a 200 KB message is not copied and hashed whole (openings that agree that
    far share that much cache anyway). completions: the prompt's first `prefix_chars` characters (the first prompt
    of a batch; token-id prompts: as many leading ids)."""
    if route == "chat":
        parts: list[str] = []
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, dict):
                break
            text = message_text(message.get("content"))[:prefix_chars]
            parts.append(f"{message.get('role', '')}\n{text}\n")
            if message.get("role") == "user":
                break
        return "".join(parts).encode()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return ",".join(str(t) for t in prompt[:prefix_chars]).encode()
    return str(prompt or "")[:prefix_chars].encode()
