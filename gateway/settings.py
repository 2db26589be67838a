"""The gateway's settings (flags of `kubellm gateway`), checked once."""

from __future__ import annotations

from dataclasses import dataclass

from kubellm import contract
from kubellm.gateway.balance import DEFAULT_LOAD_FACTOR, DEFAULT_PREFIX_CHARS


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = contract.GATEWAY_PORT
    namespaces: tuple[str, ...] = ()  # empty: the whole cluster
    max_body_bytes: int = 16 * 1024 * 1024
    hold_timeout_seconds: float = 300.0  # how long a request waits for a replica of a model at zero
    max_held_per_model: int = 100  # past it: 429 with Retry-After
    keepalive_seconds: float = 5.0  # a held stream gets `: waiting for <model>` this often
    connect_timeout_seconds: float = 3.0
    eject_seconds: float = 1.0  # a replica that refused a connection (or answered 503) is skipped this long
    load_factor: float = DEFAULT_LOAD_FACTOR  # c of the bounded loads
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    scrape_interval_seconds: float = 1.0
    resync_seconds: float = 300.0
    wake_interval_seconds: float = 5.0  # at most one wake write per model this often
    # a wake waits this long after the first held request, counting the burst that came with it (the operator
    # wakes the model to as many replicas as that queue asks for)
    wake_gather_seconds: float = 0.5
    retry_after_seconds: int = 5
    # the response cache (models with spec.routing.responseCache): all answers together, and the largest one kept
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_max_entry_bytes: int = 1024 * 1024
    # API keys (one per line; a mounted Secret, re-read when it changes) and per-key limits (0: off)
    api_key_file: str = ""
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0

    def check(self) -> None:
        if self.wake_gather_seconds < 0:
            raise ValueError("--wake-gather-seconds must be >= 0")
        for name in ("hold_timeout_seconds", "keepalive_seconds", "connect_timeout_seconds", "scrape_interval_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.load_factor < 1.0:
            raise ValueError("--load-factor must be >= 1 (the bound is load_factor times the mean load)")
        if self.max_held_per_model < 0 or self.max_body_bytes < 1 or self.prefix_chars < 1:
            raise ValueError("--max-held-per-model must be >= 0, --max-body-bytes and --prefix-chars >= 1")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise ValueError("--rate-limit-rpm and --rate-limit-tpm must be >= 0 (0: no limit)")
        if self.cache_max_bytes < 0 or self.cache_max_entry_bytes < 0:
            raise ValueError("--cache-max-bytes and --cache-max-entry-bytes must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be 0..65535")
