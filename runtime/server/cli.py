"""``kubellm serve``: load a model and serve it over the OpenAI-compatible API until SIGTERM.

The HTTP listener starts first, so /health answers (and /ready says "loading") while the weights load.
On SIGTERM (or Ctrl-C): /ready turns false, new requests get 503, in-flight requests finish for up to
``--drain-timeout`` seconds, whatever is left is aborted, and the process exits 0. A second signal ends the
drain at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kubellm import contract

from .. import config

DEFAULT_PORT = contract.CONTAINER_PORT


def _in_container() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        or Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help='a JSON file {"engine": {EngineConfig fields}, "server": {flags by dest}} (the operator\'s '
        "ConfigMap); a flag given with a value other than its default overrides the file",
    )
    # The engine's flags are generated from EngineConfig's fields (runtime/config.py): one definition.
    config.add_arguments(parser.add_argument_group("model and engine"))

    http = parser.add_argument_group("HTTP server")
    http.add_argument(
        "--host", default=None, help="address to listen on (default: 0.0.0.0 inside a container, else 127.0.0.1)"
    )
    http.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port (0: any free port)")
    http.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this API key (repeatable); also --api-key-file and $KUBELLM_API_KEYS",
    )
    http.add_argument("--api-key-file", default=None, help="a file with one API key per line")
    http.add_argument(
        "--max-queue-len",
        type=_positive_int,
        default=1024,
        help="requests waiting for the engine at most; more get 429",
    )
    http.add_argument("--rate-limit-rpm", type=_non_negative_int, default=0, help="requests per minute per key")
    http.add_argument("--rate-limit-tpm", type=_non_negative_int, default=0, help="tokens per minute per key")
    http.add_argument(
        "--max-body-bytes", type=_positive_int, default=2 * 1024 * 1024, help="request bodies larger than this get 413"
    )
    http.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests may take to finish after SIGTERM"
    )
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    from ..reasoning import REASONING_PARSERS
    from ..tool_parsers import TOOL_PARSER_NAMES

    agent = parser.add_argument_group("tool calling and reasoning")
    agent.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=[*TOOL_PARSER_NAMES, "none"],
        help="how tool_choice auto reads calls from the output (auto: the chat template's format; none: text only)",
    )
    agent.add_argument(
        "--reasoning-parser",
        default=None,
        choices=sorted(REASONING_PARSERS),
        help="put <think> text in reasoning_content (structured outputs then constrain only the answer)",
    )


def apply_config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings: EngineConfig's defaults, then the --config file's "engine" section, then the engine
    flags given (a flag counts as given when its value is not the default). The file's "server" section sets the
    other flags where the command line left their defaults. Returns the engine settings by field name; `args` is
    updated in place for the server ones."""
    loaded: dict[str, Any] = {}
    if args.config:
        loaded = json.loads(Path(args.config).read_text())
        if not isinstance(loaded, dict) or set(loaded) - {"engine", "server"}:
            raise ValueError(f'{args.config}: expected an object with "engine" and "server" sections')
    engine_fields = {f.name for f in dataclasses.fields(config.EngineConfig)}
    engine = dict(loaded.get("engine") or {})
    engine.update(config.given(args))  # flags given win
    server = dict(loaded.get("server") or {})
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    engine_dests = {config.dest_name(f) for f in config.cli_fields()}
    for key, value in server.items():
        if key not in defaults or key in engine_fields | engine_dests or key == "config":
            raise ValueError(f"{args.config}: unknown server setting {key!r}")
        if getattr(args, key, defaults[key]) == defaults[key]:
            setattr(args, key, value)
    return engine


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # our own request log replaces it


def run(args: argparse.Namespace) -> int:
    import asyncio

    from kubellm.apikeys import load_api_keys

    from .app import ServerSettings

    try:
        engine = apply_config_file(args)
    except (OSError, ValueError) as exc:
        print(f"kubellm serve: error: --config: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    log = logging.getLogger("kubellm.server")
    try:
        engine_config = config.engine_config(engine)
        settings = ServerSettings(
            served_model_name=engine_config.served_model_name or engine_config.model,
            api_keys=load_api_keys(args.api_key, args.api_key_file),
            max_queue_len=args.max_queue_len,
            rate_limit_rpm=args.rate_limit_rpm or None,
            rate_limit_tpm=args.rate_limit_tpm or None,
            max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout,
            tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
        )
    except ValueError as exc:
        print(f"kubellm serve: error: {exc}", file=sys.stderr)
        return 2
    host = args.host or ("0.0.0.0" if _in_container() else "127.0.0.1")
    if engine_config.node_rank > 0:  # a node of a multi-node replica: workers and probes, no API
        from ..distributed.node import serve_node

        return asyncio.run(serve_node(engine_config, host, args.port))
    if settings.api_keys:
        log.info("API keys: %d configured", len(settings.api_keys))  # never the keys themselves
    return asyncio.run(serve(engine_config, settings, host, args.port))


async def serve(config: Any, settings: Any, host: str, port: int) -> int:
    """Listen, load the model, serve until a signal, drain, exit. Returns the process exit status."""
    import asyncio
    import signal

    from aiohttp import web

    from ..engine.async_engine import AsyncEngine
    from .app import OpenAIServer

    log = logging.getLogger("kubellm.server")
    server = OpenAIServer(settings)
    # Handler cancellation: a client that disconnects cancels its handler, which aborts its engine request.
    runner = web.AppRunner(server.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []  # the real port when asked for port 0
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("listening on http://%s:%d (model loading)", host, bound)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            server.abort_all()  # a second signal: stop waiting for in-flight requests

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    engine: AsyncEngine | None = None
    status = 0
    try:
        load = asyncio.create_task(asyncio.to_thread(AsyncEngine, config))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            try:
                engine = load.result()
            except Exception:
                log.exception("could not load the model %s", config.model)
                return 1
            await engine.start()
            server.set_engine(engine)
            # a tensor-parallel worker that dies: /ready turns 503 at once, then the process exits non-zero
            engine.engine.runner.on_worker_failure(lambda reason: server.start_draining())

            def engine_failed(error: BaseException) -> None:  # the step loop died (a lost node, a bug): exit 1
                nonlocal status
                log.critical("the engine failed (%r): draining, then exiting with status 1", error)
                status = 1
                loop.call_soon_threadsafe(server.start_draining)
                loop.call_soon_threadsafe(stop.set)

            engine.on_failure.append(engine_failed)
            stats = engine.stats()
            log.info(
                "ready: serving %s on http://%s:%d (max_model_len %d, %d KV blocks of %d tokens)",
                settings.served_model_name,
                host,
                bound,
                engine.max_model_len,
                stats.num_gpu_blocks,
                stats.block_size,
            )
            print(f"kubellm: serving on http://{host}:{bound}", file=sys.stderr, flush=True)
        await stopped
        server.start_draining()
        if not await server.wait_idle(settings.drain_timeout):
            log.warning(
                "drain timeout (%.0f s) passed with %d requests in flight: aborting them",
                settings.drain_timeout,
                server.in_flight,
            )
            server.abort_all()
            await server.wait_idle(5.0)
        log.info("drained; shutting down")
    finally:
        await runner.cleanup()
        if engine is not None:
            await engine.shutdown()
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m kubellm.runtime.server.cli [flags]``: the same as ``kubellm serve [flags]``."""
    parser = argparse.ArgumentParser(prog="kubellm serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
