"""Operator settings from KUBELLM_* environment variables, checked once at start-up (a bad value stops the start)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

PREFIX = "KUBELLM_"
T = TypeVar("T")


class SettingsError(ValueError):
    """A KUBELLM_* variable has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Every knob the operator reads from its environment. Field `foo_bar` is read from `KUBELLM_FOO_BAR`."""

    # Namespaces to watch (comma-separated names or kopf globs such as `team-*`); empty means the whole cluster.
    namespaces: tuple[str, ...] = ()
    # Runtime image when an LLMDeployment does not name one.
    runtime_image: str = "ghcr.io/kubellm/runtime:0.1.0"  # the GPU image Dockerfile.runtime builds
    # kopf peering: empty runs standalone (no KopfPeering objects needed); a name enables peering under it.
    peering: str = ""
    # This replica's peering priority: the highest live one reconciles, the others stand by. kopf pauses EVERY
    # replica when two live peers tie, so 0 (the default) draws a random priority per process.
    peering_priority: int = 0
    # How long a replica's peering keep-alive stands (kopf refreshes it a few seconds sooner): when the leader dies
    # without leaving (SIGKILL, a lost node), a standby takes over this long after its last keep-alive.
    peering_lifetime_seconds: int = 60
    log_level: str = "INFO"
    # Per-object timer: refresh status (pods Pending for GPUs, readiness) and, when due, evaluate autoscaling.
    timer_interval_seconds: float = 5.0
    # Every LLMDeployment's objects are re-applied this often whatever happened (nothing is left unreconciled after
    # an outage or a missed event); drift seen by the watches is corrected at once.
    resync_seconds: float = 300.0
    # status.metrics is rewritten at most this often, and only when its numbers moved (a quiet fleet writes nothing).
    metrics_status_interval_seconds: float = 30.0
    # Metric scraping: per-pod timeout and the most scrapes in flight at once (all LLMDeployments together).
    scrape_timeout_seconds: float = 2.0
    scrape_concurrency: int = 32
    # The gateways' /metrics, comma-separated (empty: no gateway). A host may name a headless Service: every address
    # it resolves to is one gateway pod, scraped each tick for the requests it holds per LLMDeployment
    # (kubellm_gateway_held_requests), which the autoscaler adds to the queue (held for want of a Ready replica).
    gateway_metrics_urls: tuple[str, ...] = ()
    # How long a replica may take to load its model before the startup probe gives up on it.
    startup_timeout_seconds: int = 1800
    # Time a terminating replica gets to finish in-flight requests (terminationGracePeriodSeconds).
    drain_seconds: int = 60
    # preStop pause so endpoints drop the pod before the runtime stops accepting requests.
    prestop_sleep_seconds: int = 5
    # kopf handler policy: bounded retries with backoff, and a timeout per handler.
    handler_retries: int = 10
    handler_backoff_seconds: float = 2.0
    handler_timeout_seconds: float = 120.0
    # Threads for blocking Kubernetes API calls (the event loop's default executor), and as many pooled connections.
    max_workers: int = 16
    # kopf's liveness endpoint (empty: none), e.g. http://0.0.0.0:8080/healthz
    liveness_endpoint: str = ""
    # A JSON core/v1 PodSecurityContext merged into every runtime pod's (e.g. {"fsGroup": 1000} for a PVC cache
    # on a cluster that assigns none); an LLMDeployment's spec.pod.securityContext goes on top.
    runtime_pod_security_context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = PREFIX + f.name.upper()
            raw = env.get(var)
            if raw is None:
                continue
            values[f.name] = _PARSERS[f.name](var, raw)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        positive = {
            "timer_interval_seconds": self.timer_interval_seconds,
            "resync_seconds": self.resync_seconds,
            "scrape_timeout_seconds": self.scrape_timeout_seconds,
            "scrape_concurrency": self.scrape_concurrency,
            "startup_timeout_seconds": self.startup_timeout_seconds,
            "handler_backoff_seconds": self.handler_backoff_seconds,
            "handler_timeout_seconds": self.handler_timeout_seconds,
            "max_workers": self.max_workers,
            "peering_lifetime_seconds": self.peering_lifetime_seconds,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{PREFIX}{name.upper()} must be > 0, got {value}")
        non_negative = {
            "drain_seconds": self.drain_seconds,
            "prestop_sleep_seconds": self.prestop_sleep_seconds,
            "metrics_status_interval_seconds": self.metrics_status_interval_seconds,
            "handler_retries": self.handler_retries,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise SettingsError(f"{PREFIX}{name.upper()} must be >= 0, got {value}")
        if self.prestop_sleep_seconds >= max(self.drain_seconds, 1):
            raise SettingsError(
                f"{PREFIX}PRESTOP_SLEEP_SECONDS ({self.prestop_sleep_seconds}) must be < "
                f"{PREFIX}DRAIN_SECONDS ({self.drain_seconds}): the pause is part of the grace period"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}"
            )
        if not self.runtime_image.strip():
            raise SettingsError(f"{PREFIX}RUNTIME_IMAGE must not be empty")


def _number(kind: Callable[[str], T]) -> Callable[[str, str], T]:
    def parse(var: str, raw: str) -> T:
        try:
            return kind(raw.strip())
        except ValueError:
            raise SettingsError(f"{var} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None

    return parse


def _text(var: str, raw: str) -> str:
    return raw.strip()


def _urls(var: str, raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    for url in urls:
        if not re.fullmatch(r"https?://[^/\s:,]+(:\d+)?(/\S*)?", url):
            raise SettingsError(
                f"{var}: {url!r} is not an http(s) URL such as http://kubellm-gateway-pods.kubellm:8080/metrics"
            )
    return urls


def _json_object(var: str, raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise SettingsError(f"{var} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{var} must be a JSON object, got {raw!r}")
    return value


def parse_namespaces(var: str, raw: str) -> tuple[str, ...]:
    """Namespace names or kopf's glob patterns (`team-*`, `!team-test`)."""
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if len(name) > 64 or not re.fullmatch(r"!?[a-z0-9*?]([-a-z0-9*?]*[a-z0-9*?])?", name):
            raise SettingsError(f"{var}: {name!r} is neither a namespace name nor a glob pattern")
    return names


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "namespaces": parse_namespaces,
    "runtime_image": _text,
    "peering": _text,
    "peering_priority": _number(int),
    "peering_lifetime_seconds": _number(int),
    "log_level": _text,
    "liveness_endpoint": _text,
    "timer_interval_seconds": _number(float),
    "resync_seconds": _number(float),
    "metrics_status_interval_seconds": _number(float),
    "scrape_timeout_seconds": _number(float),
    "scrape_concurrency": _number(int),
    "gateway_metrics_urls": _urls,
    "startup_timeout_seconds": _number(int),
    "drain_seconds": _number(int),
    "prestop_sleep_seconds": _number(int),
    "handler_retries": _number(int),
    "handler_backoff_seconds": _number(float),
    "handler_timeout_seconds": _number(float),
    "max_workers": _number(int),
    "runtime_pod_security_context": _json_object,
}
