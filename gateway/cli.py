"""`kubellm gateway`: the front door for every LLMDeployment of the watched namespaces (or the whole cluster).

aiohttp and the kubernetes client's config loaders are imported inside `run`, so `kubellm --help` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from kubellm.gateway.settings import GatewaySettings

_FLAGS = {
    "max_body_bytes": "largest request body accepted (413 above it)",
    "hold_timeout_seconds": "how long a request waits for a replica of its model (503 after it)",
    "max_held_per_model": "most requests held per model while it has no ready replica (429 past it)",
    "keepalive_seconds": "a held streaming request gets an SSE comment this often",
    "connect_timeout_seconds": "connect timeout to a replica (a failed connect is retried on another)",
    "eject_seconds": "a replica that refused a connection or answered 503 is skipped this long",
    "load_factor": "PrefixHash: no replica takes more than this times the mean load (>= 1)",
    "prefix_chars": "completions: leading prompt characters hashed",
    "scrape_interval_seconds": "how often the replicas' /metrics are scraped for their load",
    "resync_seconds": "full re-list of the watched objects this often",
    "wake_interval_seconds": "at most one wake write per model this often",
    "wake_gather_seconds": "a wake waits this long after the first held request, to count the burst with it",
    "cache_max_bytes": "the response cache's bound, all answers together",
    "cache_max_entry_bytes": "the largest answer the response cache keeps",
    "api_key_file": "API keys, one per line (a mounted Secret; re-read when it changes; also $KUBELLM_API_KEYS)",
    "rate_limit_rpm": "requests per minute per API key (0: no limit)",
    "rate_limit_tpm": "tokens per minute per API key, prompts estimated (0: no limit)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GatewaySettings()
    parser.add_argument("--host", default=defaults.host, help="listen address (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=defaults.port, help="listen port")
    parser.add_argument(
        "--namespace", "-n", action="append", default=None, help="watch this namespace (repeatable); default: all"
    )
    for name, help_text in _FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(default), default=default, help=f"{help_text} ({default})"
        )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GatewaySettings) if hasattr(args, f.name)}
    values["namespaces"] = tuple(args.namespace or ())
    settings = GatewaySettings(**values)
    settings.check()
    return settings


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"kubellm gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stdout)

    from aiohttp import web

    from kubellm.gateway.app import Gateway, build_app
    from kubellm.gateway.kube import Kube, KubeConfig

    try:
        gateway = Gateway(settings, Kube(KubeConfig.load()))
    except ValueError as exc:  # an unreadable --api-key-file
        print(f"kubellm gateway: {exc}", file=sys.stderr)
        return 2
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream connection.
    web.run_app(
        build_app(gateway),
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        access_log=None,
        print=lambda *_: logging.getLogger("kubellm.gateway").info(
            "listening on %s:%d, namespaces %s", settings.host, settings.port, list(settings.namespaces) or "all"
        ),
    )
    return 0
