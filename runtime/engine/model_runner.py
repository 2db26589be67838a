"""ModelRunner: owns the device, the dtype, the model and its paged KV cache; turns a scheduled batch into one
forward pass.

At construction it resolves the device and dtype, picks the device's attention backend (once), builds the model
straight into its dtype on its device (models/build.py), prepares the CPU's weight copies (oneDNN packing, int4),
sizes the KV cache (a profiling pass on a GPU) and allocates it, and captures decode CUDA graphs where the backend
allows. Per step it builds, once, the flat token batch (decodes first, then prefill chunks) and the attention
metadata every layer shares, runs the model, and returns float32 logits for the sequences that sample this step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import CacheConfig, EngineConfig
from ..distributed.parallel import PipelineStage, TensorParallel, check_devices, check_tensor_parallel
from ..distributed.pipeline import StageClock, run_pipelined
from ..distributed.workers import ParallelGroup, WorkerGroup, init_method_for
from ..kernels import cpu, kv_quant
from ..kernels.dispatch import get_attention_backend
from ..models.build import build_model, model_weight_bytes
from ..quantization.cpu_int4 import cpu_int4_is_fast
from ..quantization.registry import checkpoint_quant_method, quant_config_for
from . import cuda_graphs
from .kv_cache_dtype import calibrate_kv_scales, resolve_kv_cache_dtype
from .scheduler import ScheduledSeq, SchedulerOutput
from .step_input import StepInput, plan_step, prompt_logprob_positions, step_tensors

if TYPE_CHECKING:
    from ..models.config import ModelConfig
    from ..models.loader import LoadedModel

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32
# kept free on a GPU besides the profiled activations: the CUDA-graph pool and allocator fragmentation
GPU_RESERVE_BYTES = 256 << 20
FOUR_BIT_FORMATS = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # served by torch's int4 kernel
# llama.cpp's Q4_K_M / Q4_K_S mixes: most matrices Q4_K, some (v, down, in some layers) Q6_K or Q5_K; Q5_K_M: Q5_K
# and Q6_K. Their Q5_K / Q6_K layers are kept as the file's int8 groups (our C++ kernel, AVX2 and AVX-512 alike).
K_QUANT_MIX_EXTRAS = frozenset({"Q5_K", "Q6_K"})
KEEPALIVE = "keepalive"  # broadcast instead of a step by an idle rank 0


@dataclass
class PromptLogits:
    """One sequence's logits at prompt positions ``start .. start + len(logits) - 1``: each scores the next token."""

    scheduled: ScheduledSeq
    start: int
    logits: torch.Tensor  # [k, vocab] float32


@dataclass
class ModelRunnerOutput:
    # [sum of num_sample_rows, vocab] float32: per sampling[i] in order, 1 + len(its drafts) consecutive rows
    logits: torch.Tensor
    sampling: list[ScheduledSeq]  # the sequences whose next token is sampled this step, in row order
    prompt_logits: list[PromptLogits] = field(default_factory=list)  # prompts being scored (prompt_logprobs)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu.cpu_flags())


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        # A decode step reads every weight once, so half the bytes is about twice the speed (SmolLM2, one stream,
        # 2-core EPYC, quiet machine: 37 vs 18 tok/s), but only where the CPU has bf16 units; elsewhere bf16 is
        # emulated. (An earlier measurement that found bf16 no faster was taken with the cores oversubscribed.)
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"float16": torch.float16, "float32": torch.bfloat16}.get(checkpoint_dtype, torch.bfloat16)


def resolve_quantization(
    quantization: str,
    device: torch.device,
    weight_formats: frozenset[str],
    int4_fast: bool | None = None,
    checkpoint_method: str | None = None,
) -> str:
    """ "auto" -> the checkpoint's own format (``checkpoint_method``: its quantization_config's quant_method);
    else "int4" on the CPU for a checkpoint whose layers are 4-bit already or a GGUF K-quant mix (nothing is lost:
    Q4_K_M / Q4_K_S / Q5_K_M, their Q5_K / Q6_K layers kept as int8 groups), where the kernels it needs are fast:
    torch's int4 kernel for 4-bit layers (``int4_fast``, default: the CPU's vector ISA), our int8 group kernel
    for a mix of Q5_K / Q6_K only (vectorized for AVX2 too); else "none"."""
    if quantization == "auto" and checkpoint_method is not None:
        return checkpoint_method
    if quantization == "int4" and device.type != "cpu":
        raise ValueError(f"quantization int4 is a CPU path (torch's CPU int4 kernel); the device is {device.type}")
    if quantization == "auto":
        k_quants = weight_formats & (K_QUANT_MIX_EXTRAS | {"Q4_K"})
        four_bit = bool(weight_formats) and weight_formats <= FOUR_BIT_FORMATS
        mix = bool(k_quants) and weight_formats <= FOUR_BIT_FORMATS | K_QUANT_MIX_EXTRAS
        if device.type != "cpu" or not (four_bit or mix):
            return "none"
        if not weight_formats & FOUR_BIT_FORMATS:  # Q5_K / Q6_K only: int8 groups, no int4 kernel
            return "int4"
        return "int4" if (cpu_int4_is_fast() if int4_fast is None else int4_fast) else "none"
    return quantization


def num_speculative_tokens(config: EngineConfig) -> int:
    """Drafts a sequence may verify per step (each one more logits row)."""
    if config.speculative_config is None:
        return 0
    from ..spec_decode.config import SpeculativeConfig

    return SpeculativeConfig.from_dict(config.speculative_config).num_speculative_tokens


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        *,
        max_model_len: int,
        rank: int = 0,
        init_method: str | None = None,
        draft_model_config: ModelConfig | None = None,
    ) -> None:
        """``loaded``: the checkpoint (its weights iterator is consumed here); ``max_model_len``: resolved by the
        engine (the longest sequence a step may hold). With ``tensor_parallel_size`` N > 1, rank 0 (the engine's
        runner) spawns ranks 1 .. N-1 (distributed/workers.py), which build a runner each with their ``rank``.
        ``draft_model_config``: a speculative draft model that will get as many KV blocks as this cache, so the
        KV budget is split between the two in proportion to their bytes per block."""
        self.config = config
        self.draft_model_config = draft_model_config
        self.max_model_len = max_model_len
        self.rank = rank
        mc = loaded.config
        tp_size = config.tensor_parallel_size
        world = tp_size * config.pipeline_parallel_size
        check_tensor_parallel(tp_size, mc.num_attention_heads, mc.num_key_value_heads, mc.intermediate_size)
        PipelineStage.of(0, config.pipeline_parallel_size, mc.num_hidden_layers)  # refuses more stages than layers
        device = resolve_device(config.device)
        check_devices(config.ranks_per_node, device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", rank % config.ranks_per_node)  # one rank per GPU of its node
            torch.cuda.set_device(device)
        self.device = device
        self.dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        self.workers: WorkerGroup | None = None
        self.group: ParallelGroup | None = None
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        self.stage = PipelineStage.single(mc.num_hidden_layers)
        self.stage_clock = StageClock(rank)
        tp = self._join_group(init_method, mc.num_hidden_layers) if world > 1 else TensorParallel.single()
        try:
            self._build(loaded, tp)
        except BaseException:
            self._abandon_workers()
            raise

    def _join_group(self, init_method: str | None, num_layers: int) -> TensorParallel:
        init_method = init_method or init_method_for(self.config)
        if self.rank == 0:  # the workers load their shards while this process loads its own
            self.workers = WorkerGroup(self.config, self.max_model_len, init_method)
        try:
            self.group = ParallelGroup(self.rank, self.config, num_layers, init_method, self.device)
        except BaseException:
            self._abandon_workers()
            raise
        self.stage = self.group.stage
        self.stage_clock.stage = self.stage.rank
        return self.group.tp

    def _abandon_workers(self) -> None:
        """Construction failed on rank 0: end the workers (they would wait for this rank until their timeout)."""
        if self.workers is not None:
            self.workers.stopping = True
            for p in self.workers.processes:
                p.kill()
            self.workers.shutdown()
            self.workers = None
        if self.group is not None:
            self.group.close()
            self.group = None

    def _build(self, loaded: LoadedModel, tp: TensorParallel) -> None:
        config, device, dtype, mc = self.config, self.device, self.dtype, loaded.config
        self.backend = get_attention_backend(device)
        self.quantization = resolve_quantization(
            config.quantization,
            device,
            loaded.weight_formats,
            checkpoint_method=checkpoint_quant_method(loaded.hf_config),
        )
        quant = quant_config_for(self.quantization, loaded.hf_config, loaded.weight_formats)
        if quant is not None:
            quant.check_device(device)
        self.model = build_model(
            mc, loaded.weights, backend=self.backend, device=device, dtype=dtype, seed=config.seed, tp=tp,
            stage=self.stage, quant=quant,
        )  # fmt: skip
        if device.type == "cpu":
            self.model.pack_for_cpu()

        # this rank's KV heads only; every rank holds the same number of blocks (the fewest any can afford)
        num_kv_heads = self.model.num_kv_heads
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)
        bytes_per_block = kv_cache_bytes_per_block(
            self.stage.num_layers, config.block_size, num_kv_heads, mc.head_dim, self.kv_cache_dtype
        )
        draft = self.draft_model_config
        if draft is not None:  # its blocks come out of the same budget, one beside each of ours
            bytes_per_block += kv_cache_bytes_per_block(
                draft.num_hidden_layers, config.block_size, draft.num_key_value_heads, draft.head_dim,
                self.kv_cache_dtype,
            )  # fmt: skip
        num_blocks = config.num_gpu_blocks or max(1, self._kv_cache_budget() // bytes_per_block)
        if self.group is not None:
            num_blocks = self.group.min_over_ranks(num_blocks)
        self.cache_config = CacheConfig(
            config.block_size, num_blocks, config.enable_prefix_caching, cache_dtype=config.kv_cache_dtype
        )
        if kv_quant.is_quantized(self.kv_cache_dtype):
            self.model.set_kv_scales(self._calibrate_kv_scales(num_kv_heads, mc.head_dim, mc.vocab_size))
        # one kv_cache per layer of this stage: [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [
            torch.zeros(
                2, num_blocks, config.block_size, num_kv_heads, mc.head_dim, dtype=self.kv_cache_dtype, device=device
            )
            for _ in range(self.stage.num_layers)
        ]
        # decode graphs replay one whole model: not with pipeline stages (eager there)
        if device.type == "cuda" and not config.enforce_eager and self.stage.size == 1:
            self._capture_graphs()  # on every rank: each replays its own graph, collectives included
            if self.group is not None and not self.group.min_over_ranks(int(self.graphs is not None)):
                self.graphs = None  # every rank takes the same path, or their collectives would not pair up

    @torch.inference_mode()
    def _calibrate_kv_scales(self, num_kv_heads: int, head_dim: int, vocab_size: int) -> list[torch.Tensor | None]:
        """A quantized cache's per-layer scales from one calibration prefill (on every rank: its collectives pair).
        Under tensor parallelism each rank sees only its KV heads: the ranks take the largest scale of each layer,
        so the scales are the layer's whatever the sharding (and TP N reads the same codes as TP 1)."""

        def run_step(step: StepInput, caches: list[torch.Tensor]) -> None:
            self.kv_caches = caches
            self.execute_step(step)

        scales = calibrate_kv_scales(
            run_step,
            (self.config.block_size, num_kv_heads, head_dim),
            self.stage.num_layers,
            num_tokens=min(kv_quant.CALIBRATION_TOKENS, self.max_model_len),
            vocab_size=vocab_size,
            model_dtype=self.dtype,
            cache_dtype=self.kv_cache_dtype,
            device=self.device,
        )
        stacked = self.model.tp.all_reduce_max(torch.stack(scales))  # [num_layers, 2]
        return list(stacked.unbind(0))

    def _kv_cache_budget(self) -> int:
        config = self.config
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_CACHE_BYTES
        if self.stage.size > 1:
            raise ValueError("pipeline_parallel_size > 1 on a GPU needs kv_cache_memory_bytes (no profiling pass yet)")
        # a profiling pass: the largest step the scheduler can build, for its activation peak
        activations = cuda_graphs.profile_activation_bytes(
            self.model,
            num_tokens=min(config.max_num_batched_tokens, self.max_model_len * config.max_num_seqs),
            max_model_len=self.max_model_len,
            num_logits=config.max_num_seqs * (1 + num_speculative_tokens(config)),  # a verified draft: a row
            block_size=config.block_size,
        )
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # the weights, the CUDA context, other processes
        if self.draft_model_config is not None:  # a draft model's weights, loaded after this cache is allocated
            used += model_weight_bytes(self.draft_model_config, self.dtype)
        budget = int(total * config.gpu_memory_utilization) - used - activations - GPU_RESERVE_BYTES
        logger.info(
            "GPU memory: %.1f GiB total, %.1f GiB in use, %.2f GiB peak activations: %.1f GiB for the KV cache",
            total / 2**30, used / 2**30, activations / 2**30, max(budget, 0) / 2**30,
        )  # fmt: skip
        return max(0, budget)

    def _capture_graphs(self) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                self.graphs = cuda_graphs.DecodeGraphs(
                    self.model,
                    self.kv_caches,
                    sizes=cuda_graphs.capture_sizes(self.config.max_num_seqs),
                    max_blocks_per_seq=-(-self.max_model_len // self.cache_config.block_size),
                    max_seq_len=self.max_model_len,
                    device=self.device,
                    graph_factory=cuda_graphs.CudaGraph,
                )
        except (RuntimeError, ValueError) as e:  # serve eager rather than not at all
            logger.warning("decode CUDA graphs could not be captured (%s): running eager", e)
        else:
            logger.info(
                "captured decode CUDA graphs for %d batch sizes in %.1f s",
                len(self.graphs.sizes),
                time.perf_counter() - started,
            )

    # ---- steps ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ModelRunnerOutput:
        """Rank 0: run one step (on every rank)."""
        # decodes (one new token) first: the attention backends batch them together
        items = sorted(batch.scheduled, key=lambda s: s.num_query_tokens != 1)
        step = plan_step(items, self.cache_config.block_size)
        if self.group is not None:
            self.group.broadcast_step(step)
        logits = self.execute_step(step)
        assert logits is not None
        sampling = [s for s in items if s.samples]
        if len(step.logit_rows) == sum(s.num_sample_rows for s in sampling):
            return ModelRunnerOutput(logits, sampling)
        # some rows score prompts: per item its prompt rows, then its sampled row (plan_step's order)
        out = ModelRunnerOutput(logits, sampling)
        sample_rows: list[int] = []
        row = 0
        for s in items:
            positions = prompt_logprob_positions(s)
            if positions:
                out.prompt_logits.append(PromptLogits(s, positions.start, logits[row : row + len(positions)]))
                row += len(positions)
            sample_rows.extend(range(row, row + s.num_sample_rows))
            row += s.num_sample_rows
        out.logits = logits[sample_rows]
        return out

    def execute_step(self, step: StepInput) -> torch.Tensor | None:
        """Every rank: the forward pass of one planned step -> logits of its ``logit_rows`` [N, vocab] float32
        (None on the ranks of a pipeline whose logits go to rank 0)."""
        if self.stage.size > 1:
            return run_pipelined(self, step)
        graphs = self.graphs
        if graphs is not None and step.is_decode_only and len(step.seq_lens) <= graphs.max_batch_size:
            hidden = graphs.run(
                input_ids=step.input_ids,
                positions=step.positions,
                slot_mapping=step.slot_mapping,
                block_tables=step.block_tables,
                seq_lens=step.seq_lens,
            )
        else:
            input_ids, positions, md = step_tensors(step, self.device)
            hidden = self.model(input_ids, positions, self.kv_caches, md)  # [T, H]
        if not step.logit_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(step.logit_rows, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """A worker rank: execute what rank 0 broadcasts until it sends None."""
        assert self.group is not None and self.rank > 0
        while True:
            step = self.group.broadcast_step(None)
            if step is None:
                break
            if step == KEEPALIVE:
                continue
            assert isinstance(step, StepInput)
            self.execute_step(step)
        self.stage_clock.report()
        self.group.close()

    def keepalive(self) -> None:
        """Rank 0, idle: one small broadcast, which raises when a rank has gone (a lost node is seen in seconds,
        not at the next request)."""
        if self.group is not None:
            self.group.broadcast_step(KEEPALIVE)

    def on_worker_failure(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(reason)`` when a tensor-parallel worker dies, just before the process exits (no-op at TP 1)."""
        if self.workers is not None:
            self.workers.on_failure.append(hook)

    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the process group (a no-op with one rank)."""
        if self.group is None:
            return
        if self.workers is not None:
            self.workers.stopping = True
            self.group.broadcast_step(None)
            self.workers.shutdown()
        self.stage_clock.report()
        self.group.close()
        self.group = None
