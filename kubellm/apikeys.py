"""Optional API keys, for the runtime's server and the gateway alike: ``Authorization: Bearer <key>``, compared in
constant time.

Keys come from ``--api-key`` (repeatable), ``--api-key-file`` (one key per line, ``#`` comments; a mounted Secret)
and the environment variable ``KUBELLM_API_KEYS`` (comma-separated). The keys themselves are never logged: a caller
is known by ``key_id``, a short hash, in logs and rate-limit buckets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

ENV_VAR = "KUBELLM_API_KEYS"
ANONYMOUS = "anonymous"
# The 401 both the runtime and the gateway answer without a valid key.
MISSING_KEY_MESSAGE = "missing or invalid API key: send 'Authorization: Bearer <key>'"
MISSING_KEY_CODE = "invalid_api_key"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kubellm"'}


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key, safe to log."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_api_keys(
    keys: Iterable[str] = (), key_file: str | None = None, environ: dict[str, str] | None = None
) -> list[str]:
    """All configured keys, deduplicated, in order; an empty list means auth is off."""
    env = os.environ if environ is None else environ
    found: list[str] = [k.strip() for k in keys]
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"--api-key-file: cannot read {path}: {exc.strerror}") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    found.extend(k.strip() for k in env.get(ENV_VAR, "").split(","))
    keys_out = list(dict.fromkeys(k for k in found if k))
    for k in keys_out:
        if any(c.isspace() for c in k) or not k.isprintable():
            raise ValueError("API keys must be printable and contain no whitespace")
    return keys_out


class APIKeyAuth:
    """Checks a request's bearer token against the configured keys."""

    def __init__(self, keys: Iterable[str], exempt_paths: Iterable[str]) -> None:
        """exempt_paths: what stays open without a key (probes, metrics), so kubelets and Prometheus need none."""
        # Compare digests: equal length inputs, so compare_digest's time does not depend on the key length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self._ids = [key_id(k) for k in keys]
        self.exempt_paths = frozenset(exempt_paths)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_exempt(self, path: str) -> bool:
        return not self.enabled or path in self.exempt_paths

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's key id, or None when the header carries no valid key."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        match: str | None = None
        # Check every key, without an early exit, so timing says nothing about which one matched.
        for candidate, ident in zip(self._digests, self._ids, strict=True):
            if hmac.compare_digest(digest, candidate):
                match = ident
        return match
