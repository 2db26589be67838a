"""Who may call the gateway, and how much: API keys (a mounted Secret's file, re-read when it changes) and per-key
rate limits in requests and tokens per minute, the runtime's own rules (kubellm/apikeys.py, kubellm/ratelimit.py).

Tokens at the gateway, which has no tokenizer: a request is charged its prompt as estimated for the routing rules
(characters / 4, route.py) when it is admitted, and its answer's `usage.completion_tokens` when that comes back (a
non-streaming answer always carries it; a stream when it asked for `stream_options.include_usage`); a stream
without it is charged one token per content event, which is what the runtime sends per token.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from kubellm import contract
from kubellm.apikeys import ANONYMOUS, CHALLENGE, MISSING_KEY_CODE, MISSING_KEY_MESSAGE, APIKeyAuth, load_api_keys
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.route import Features
from kubellm.ratelimit import RateLimiter

# Probes and scrapes stay open (kubelets and Prometheus hold no key).
EXEMPT_PATHS = frozenset({"/healthz", contract.HEALTH_PATH, "/ready", contract.METRICS_PATH})
RELOAD_CHECK_SECONDS = 5.0
TAIL_BYTES = 8192  # the end of an answer, where its usage is
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


class Access:
    def __init__(
        self,
        key_file: str,
        requests_per_minute: int,
        tokens_per_minute: int,
        environ: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """key_file: "" for none (keys may still come from $KUBELLM_API_KEYS); a limit of 0 is off. An unreadable
        key file at start is a ValueError (the gateway does not start); later, the last good keys stay."""
        self.key_file = Path(key_file) if key_file else None
        self.environ = dict(os.environ if environ is None else environ)
        self.clock = clock
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute, clock=clock)
        self._stamp: tuple[float, int] | None = None
        self._checked = -RELOAD_CHECK_SECONDS
        self.auth = APIKeyAuth([], EXEMPT_PATHS)
        self._load()

    def _load(self) -> None:
        keys = load_api_keys((), str(self.key_file) if self.key_file else None, environ=self.environ)
        self.auth = APIKeyAuth(keys, EXEMPT_PATHS)

    def _maybe_reload(self) -> None:
        """A mounted Secret changes under the file (kubelet swaps a symlink): re-read it when its stat moved."""
        now = self.clock()
        if self.key_file is None or now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self.key_file.stat()
        except OSError:
            return  # mid-swap, or gone: keep the keys we have
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            try:
                self._load()
            except ValueError:
                return
            self._stamp = stamp

    def authenticate(self, path: str, authorization: str | None) -> str:
        """The caller's key id (ANONYMOUS without keys, or on an open path); 401 without a valid key."""
        self._maybe_reload()
        if self.auth.is_exempt(path):
            return ANONYMOUS
        caller = self.auth.authenticate(authorization)
        if caller is None:
            raise GatewayError(401, MISSING_KEY_MESSAGE, code=MISSING_KEY_CODE, headers=dict(CHALLENGE))
        return caller

    def limit(self, caller: str, estimate: Callable[[], Features]) -> None:
        """Admit one generation request of `caller` (charging its prompt as `estimate` gives it, called only when
        limits are on), or 429 with Retry-After."""
        if not self.limiter.enabled:
            return
        wait = self.limiter.try_acquire(caller, estimate().prompt_tokens)
        if wait is not None:
            raise GatewayError(
                429,
                f"rate limit exceeded for {caller}: retry in {wait:.0f} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(int(wait))},
            )

    @property
    def meters_answers(self) -> bool:
        """Whether answers are charged (a tokens-per-minute limit is on): only then is an answer's tail kept."""
        return self.limiter.tpm is not None

    def charge_answer(self, caller: str, tail: bytes, content_events: int) -> None:
        """After the answer: its completion tokens (from its usage, else one per content event of a stream)."""
        found = _COMPLETION_TOKENS.findall(tail)
        self.limiter.charge(caller, int(found[-1]) if found else content_events)
