"""A node above 0 of a replica that spans several nodes (pods): ``kubellm serve --nnodes K --node-rank k``.

It runs this node's ranks as workers (``EngineConfig.node_ranks``) that join node 0's rendezvous
(``--master-addr``/``--master-port``) and execute the steps rank 0 broadcasts. It serves no API: only ``/health``
and ``/ready``, so that every pod of a group has the same probes. A worker that dies ends the process with status 1
(the group is then restarted as a whole); rank 0 ending the replica ends it with status 0; SIGTERM ends the workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from ..config import EngineConfig
from .workers import WorkerGroup, init_method_for

log = logging.getLogger("kubellm.node")


def _max_model_len(config: EngineConfig) -> int:
    """What rank 0's engine resolves (the model's config is read only when the setting is not given)."""
    if config.max_model_len is not None:
        return config.max_model_len
    from ..models.loader import load_model

    loaded = load_model(config.model, load_format=config.load_format, revision=config.revision)
    return config.resolve_max_model_len(int(loaded.config.max_position_embeddings))


async def serve_node(config: EngineConfig, host: str, port: int) -> int:
    assert config.node_rank > 0
    init_method = init_method_for(config)
    log.info(
        "node %d of %d: ranks %s joining %s", config.node_rank, config.nnodes, list(config.node_ranks), init_method
    )
    workers = WorkerGroup(config, _max_model_len(config), init_method)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_rank": config.node_rank})

    async def ready(_: web.Request) -> web.Response:
        alive = all(p.is_alive() for p in workers.processes)
        return web.json_response({"ready": alive, "node_rank": config.node_rank}, status=200 if alive else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port  # the real port when asked for port 0
    log.info("listening on http://%s:%d (node %d: probes only)", host, bound, config.node_rank)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done = loop.run_in_executor(None, workers.join)  # returns when rank 0 ended the replica
    done.add_done_callback(lambda _: stop.set())
    await stop.wait()
    if not done.done():
        log.info("signal: ending this node's workers")
        workers.terminate()
    workers.shutdown()
    await runner.cleanup()
    return 0
