"""``kubellm serve``: load a model and serve it over the OpenAI-compatible API until SIGTERM.

The HTTP listener starts first, so /health answers (and /ready says "loading") while the weights load.
On SIGTERM (or Ctrl-C): /ready turns false, new requests get 503, in-flight requests finish for up to
``--drain-timeout`` seconds, whatever is left is aborted, and the process exits 0. A second signal ends the
drain at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import DTYPES, QUANTIZATIONS

DEFAULT_PORT = 8000


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
    model = parser.add_argument_group("model and engine")
    model.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="builtin:smollm2-135m-instruct, a Hugging Face model directory, a .gguf file or hf://org/name",
    )
    model.add_argument("--revision", default=None, help="for hf:// models: a branch, tag or commit (default: main)")
    model.add_argument(
        "--chat-template", default=None, metavar="PATH", help="a Jinja chat template file replacing the model's own"
    )
    model.add_argument(
        "--served-model-name", default=None, help="the name clients use in the 'model' field (default: --model)"
    )
    model.add_argument("--dtype", default="auto", choices=DTYPES)
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument(
        "--max-model-len", type=_positive_int, default=None, help="context length in tokens (default: the model's)"
    )
    model.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV-cache block")
    model.add_argument("--max-num-seqs", type=_positive_int, default=256, help="sequences in a batch at most")
    model.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, help="tokens per step at most")
    model.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory the runtime may use"
    )
    model.add_argument(
        "--kv-cache-memory",
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="KV-cache budget in bytes (default: derived from free memory)",
    )
    model.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="turn the prefix cache off",
    )
    model.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="int4: int4 weight-only linears and an int8 head for small batches (CPU); auto: int4 for a Q4_0/Q4_1 "
        "GGUF on the CPU",
    )
    model.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation")
    model.add_argument(
        "--tensor-parallel-size",
        type=_positive_int,
        default=1,
        help="ranks splitting each layer: one process per rank (one GPU each; gloo on the CPU)",
    )
    model.add_argument(
        "--pipeline-parallel-size",
        type=_positive_int,
        default=1,
        help="stages holding contiguous layer ranges (each stage --tensor-parallel-size ranks)",
    )
    model.add_argument("--seed", type=int, default=0, help="the engine's seed for unseeded requests")

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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # our own request log replaces it


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..config import EngineConfig
    from .app import ServerSettings
    from .auth import load_api_keys

    _setup_logging(args.log_level)
    log = logging.getLogger("kubellm.server")
    try:
        config = EngineConfig(
            model=args.model,
            revision=args.revision,
            chat_template=args.chat_template,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
            quantization=args.quantization,
            enforce_eager=args.enforce_eager,
            seed=args.seed,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
        )
        settings = ServerSettings(
            served_model_name=args.served_model_name or args.model,
            api_keys=load_api_keys(args.api_key, args.api_key_file),
            max_queue_len=args.max_queue_len,
            rate_limit_rpm=args.rate_limit_rpm or None,
            rate_limit_tpm=args.rate_limit_tpm or None,
            max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout,
        )
    except ValueError as exc:
        print(f"kubellm serve: error: {exc}", file=sys.stderr)
        return 2
    host = args.host or ("0.0.0.0" if _in_container() else "127.0.0.1")
    if settings.api_keys:
        log.info("API keys: %d configured", len(settings.api_keys))  # never the keys themselves
    return asyncio.run(serve(config, settings, host, args.port))


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
