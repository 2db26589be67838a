"""The tensor-parallel worker processes: ranks 1 .. N-1, spawned by rank 0 (the engine process).

    rank 0 (engine):  schedule -> plan StepInput -> broadcast ---------> forward (all-reduces) -> logits -> sample
    rank r (worker):                     receive StepInput <-----------' forward (all-reduces) -> (logits dropped)

A worker loads its own shard of the checkpoint, then only executes the steps rank 0 broadcasts; it holds no
scheduler state. Two process groups: the forward pass's collectives (NCCL on GPUs, gloo on the CPU) time out
after ``KUBELLM_COLLECTIVE_TIMEOUT`` seconds (default 300), so a stuck rank cannot hang the others for ever; the
step broadcast runs on a gloo group without a practical timeout, since an idle server waits there.

A worker that dies takes the engine down: a monitor thread in rank 0 waits on the workers' sentinels and, unless
rank 0 is shutting down, logs which rank died and how, runs the failure hooks (the server turns /ready to 503)
and exits the process with status 1. A worker whose parent dies sees its pipe close and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .parallel import PipelineStage, TensorParallel

if TYPE_CHECKING:
    from ..config import EngineConfig

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)  # the step broadcast: an idle server waits here


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("KUBELLM_COLLECTIVE_TIMEOUT", "300")))


def init_method_for(config: EngineConfig) -> str:
    """The torch.distributed rendezvous: KUBELLM_DIST_INIT_METHOD if set; node 0's master address across nodes;
    else a free loopback port (one node)."""
    configured = os.environ.get("KUBELLM_DIST_INIT_METHOD")
    if configured:
        return configured
    if config.nnodes > 1:
        assert config.master_addr
        return f"tcp://{config.master_addr}:{config.master_port}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def world_size(config: EngineConfig) -> int:
    return config.tensor_parallel_size * config.pipeline_parallel_size


class ParallelGroup:
    """This process's membership in the parallel world: its tensor-parallel group, its pipeline stage, and the step
    channel. Global rank = stage * tensor_parallel_size + tensor-parallel rank; rank 0 is the engine's."""

    def __init__(self, rank: int, config: EngineConfig, num_layers: int, init_method: str, device: torch.device):
        tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=tp_size * pp_size, timeout=collective_timeout(),
            **kwargs,
        )  # fmt: skip
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        assert isinstance(control, dist.ProcessGroup)
        self.control = control
        self.rank = rank
        stage_index = rank // tp_size
        tp_group: dist.ProcessGroup | None = None  # None: the default group (one stage)
        if pp_size > 1:
            for s in range(pp_size):  # every rank creates every group, in the same order
                group = dist.new_group(ranks=list(range(s * tp_size, (s + 1) * tp_size)), backend=backend)
                if s == stage_index:
                    assert isinstance(group, dist.ProcessGroup)
                    tp_group = group
        self.tp = TensorParallel(rank % tp_size, tp_size, tp_group)
        self.stage = PipelineStage.of(stage_index, pp_size, num_layers)

    def broadcast_step(self, step: object) -> object:
        """Rank 0 sends ``step``; every other rank returns what rank 0 sent (None: shut down)."""
        box = [step]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """This node's worker ranks as spawned processes (on node 0: its ranks but 0, the engine's), watched by a
    monitor thread."""

    def __init__(self, config: EngineConfig, max_model_len: int, init_method: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stopping = False
        self.on_failure: list[Callable[[str], None]] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[multiprocessing.connection.Connection] = []
        self.ranks = [r for r in config.node_ranks if r != 0]
        for rank in self.ranks:
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(rank, config, max_model_len, init_method, child_end),
                name=f"kubellm-tp-rank{rank}",
                daemon=True,
            )
            p.start()
            child_end.close()
            self.processes.append(p)
            self._pipes.append(parent_end)
        atexit.register(self._mark_stopping)  # runs before multiprocessing's own exit handler ends the daemons
        self._monitor = threading.Thread(target=self._watch, name="kubellm-tp-monitor", daemon=True)
        self._monitor.start()

    def _mark_stopping(self) -> None:
        self.stopping = True

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: (rank, p) for rank, p in zip(self.ranks, self.processes, strict=True)}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self.stopping:
            return
        rank, p = by_sentinel[ready[0]]  # type: ignore[index]
        p.join(timeout=1)
        if p.exitcode == 0:  # a node above 0: rank 0 ended the replica (node 0 sets `stopping` before it does)
            logger.info("rank %d finished: rank 0 ended the replica", rank)
            return
        reason = (
            f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}: the engine cannot "
            f"continue without it; exiting"
        )
        logger.critical(reason)
        for hook in self.on_failure:
            try:
                hook(reason)
            except Exception:  # the exit below must happen whatever a hook does
                logger.exception("a worker-failure hook failed")
        logging.shutdown()
        os._exit(1)

    def join(self) -> None:
        """Wait until every worker has exited."""
        for p in self.processes:
            p.join()

    def terminate(self) -> None:
        """End the workers now (a node above 0 on SIGTERM)."""
        self.stopping = True
        for p in self.processes:
            if p.is_alive():
                p.terminate()

    def shutdown(self) -> None:
        """After rank 0 broadcast the stop: wait for the workers, end any that linger."""
        self.stopping = True
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()


def _exit_when_parent_dies(conn: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # nothing is ever sent: this returns when the parent's end closes
    os._exit(0)


def worker_main(
    rank: int, config: EngineConfig, max_model_len: int, init_method: str, conn: multiprocessing.connection.Connection
) -> None:
    """A worker process: load this rank's shard, then execute broadcast steps until rank 0 sends None."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_when_parent_dies, args=(conn,), daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks_per_node))
    from ..engine.model_runner import ModelRunner
    from ..models.loader import load_model

    loaded = load_model(config.model, load_format=config.load_format, revision=config.revision)
    runner = ModelRunner(config, loaded, max_model_len=max_model_len, rank=rank, init_method=init_method)
    runner.serve_steps()
