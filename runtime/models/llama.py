"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (per-head q/k RMSNorm), SmolLM2.

Works on a flat batch of tokens from many sequences (no padding): ``forward(input_ids [T], positions [T],
kv_caches, attn_metadata) -> hidden [T, H]``; attention reads each sequence's context from the paged KV cache.
Hugging Face checkpoint names load through ``load_weights``; q/k/v and gate/up are fused into one matmul each.

Under tensor parallelism (``tp``, distributed/parallel.py) each rank builds and loads only its shard: its heads,
its slice of the intermediate size and of the vocabulary; an all-reduce ends each attention and MLP block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel import PipelineStage, TensorParallel
from ..kernels import cpu
from ..kernels.interface import AttentionBackend, AttentionMetadata
from ..kernels.torch_backend import TorchAttentionBackend
from ..layers.activation import SiluAndMul
from ..layers.linear import INT4_MAX_ROWS, Linear, MergedLinear, pack_weight, packed_linear, quantize_int8_groups
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..layers.vocab_parallel import VocabParallelEmbedding
from ..quantization.base import QuantConfig
from ..quantization.cpu_int8_groups import int8_groups_matmul
from ..quantization.int4_groups import CodeGroups, Weight
from ..quantization.int8_groups import Int8Groups
from .config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        tp: TensorParallel,
        quant: QuantConfig | None = None,
        *,
        prefix: str,
    ) -> None:
        super().__init__()
        heads = tp.heads(config.num_attention_heads, config.num_key_value_heads)  # this rank's
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = d = config.head_dim
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.scale = d**-0.5
        kv_rows = (heads.kv_start * d, config.num_key_value_heads * d)
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=config.attention_bias,
            shard_rows={"q": (heads.q_start * d, config.num_attention_heads * d), "k": kv_rows, "v": kv_rows},
            quant=quant,
            names=tuple(f"{prefix}.{p}_proj" for p in "qkv"),
        )
        # row-parallel: this rank's heads are its columns of o_proj
        self.o_proj = Linear(
            self.q_size,
            config.hidden_size,
            input_slice=(heads.q_start * d, config.num_attention_heads * d),
            quant=quant,
            names=(f"{prefix}.o_proj",),
        )
        self.tp = tp
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, backend) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, backend) if config.qk_norm else None
        self.rotary = rotary
        self.backend = backend
        self.kv_scale: torch.Tensor | None = None  # float32 [2] (k_scale, v_scale) of a quantized KV cache

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        q_and_k = self.q_size + self.kv_size
        v = qkv[:, q_and_k:].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D], a view into qkv
        if self.q_norm is None:
            # the query and key heads are adjacent columns: one rotation pass where the backend can
            q, k = self.rotary.rotate_qk(
                positions, qkv[:, :q_and_k].view(num_tokens, -1, self.head_dim), self.num_heads
            )
        else:
            q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
            k = qkv[:, self.q_size : q_and_k].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            if self.q_norm is not None and self.k_norm is not None:
                q = self.q_norm(q)[0]
                k = self.k_norm(k)[0]
            q, k = self.rotary(positions, q, k)  # new tensors
        out = self.backend.forward(q, k, v, kv_cache, md, self.scale, self.kv_scale)  # [T, Hq, D]
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        quant: QuantConfig | None = None,
        *,
        prefix: str,
    ) -> None:
        super().__init__()
        full = config.intermediate_size
        size = full // tp.size  # this rank's slice of the intermediate size
        rows = (tp.rank * size, full)
        self.gate_up_proj = MergedLinear(
            config.hidden_size, {"gate": size, "up": size}, shard_rows={"gate": rows, "up": rows}, quant=quant,
            names=(f"{prefix}.gate_proj", f"{prefix}.up_proj"),
        )  # fmt: skip
        self.down_proj = Linear(size, config.hidden_size, input_slice=rows, quant=quant, names=(f"{prefix}.down_proj",))
        self.act = SiluAndMul(backend)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        tp: TensorParallel,
        quant: QuantConfig | None = None,
        *,
        prefix: str,
    ) -> None:
        """``prefix``: the layer's Hugging Face module name (its linears' names for a format's ignore list)."""
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, backend, tp, quant, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, backend, tp, quant, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the residual stream is added inside the next norm: norm(x + residual) -> (normed, x + residual)
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, md)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        tp: TensorParallel | None = None,
        stage: PipelineStage | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        """``dtype`` and ``device``: the rotary table's (the parameters follow torch's defaults / device context);
        ``tp``: this rank's tensor-parallel group (default: one rank); ``stage``: its pipeline stage (default: all
        layers), whose layers alone are built (the others are placeholders without parameters); ``quant``: the
        decoder linears' weight format (default: plain matrices)."""
        super().__init__()
        self.config = config
        self.quant = quant
        self.tp = tp = tp or TensorParallel.single()
        self.stage = stage = stage or PipelineStage.single(config.num_hidden_layers)
        tied = config.tie_word_embeddings
        self.backend = backend = backend or TorchAttentionBackend()
        # one rotary table shared by all layers
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, backend,
            dtype=dtype, device=device,
        )  # fmt: skip
        vocab, hidden = config.vocab_size, config.hidden_size
        # the first stage embeds; the last one needs the embedding too when it is the head (tied)
        needs_embedding = stage.is_first or (stage.is_last and tied)
        self.embed_tokens = VocabParallelEmbedding(vocab, hidden, tp) if needs_embedding else None
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, backend, tp, quant, prefix=f"model.layers.{i}")
            if stage.layer_start <= i < stage.layer_end
            else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps, backend) if stage.is_last else None
        # the head: this rank's vocabulary rows, like the embedding's (the embedding itself when tied)
        self.lm_head = VocabParallelEmbedding(vocab, hidden, tp) if stage.is_last and not tied else None
        for p in self.parameters():
            p.requires_grad_(False)
        self.packed_head: torch.Tensor | None = None  # pack_for_cpu()
        # quantize_int8_groups(): codes and group scales, for decode batches (INT4_MAX_ROWS rows at most)
        self.int8_head: Int8Groups | None = None

    @property
    def num_kv_heads(self) -> int:
        """The KV heads this rank's cache holds (all of them with one rank)."""
        return self.tp.heads(self.config.num_attention_heads, self.config.num_key_value_heads).num_kv_heads

    def set_kv_scales(self, kv_scales: list[torch.Tensor | None]) -> None:
        """Per layer of this stage: the float32 [2] (k_scale, v_scale) its quantized KV cache is read and written
        with (kernels/kv_quant.py), or None for a cache in the model's dtype."""
        stage = self.stage
        for layer, kv_scale in zip(self.layers[stage.layer_start : stage.layer_end], kv_scales, strict=True):
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.kv_scale = kv_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """The whole model (one stage): input_ids, positions: [T] -> final hidden states [T, H]."""
        hidden, residual = self.forward_stage(positions, kv_caches, attn_metadata, input_ids=input_ids)
        return self.final_norm(hidden, residual)

    def forward_stage(
        self,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        *,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's layers: from input_ids [T] (the first stage) or the previous stage's (hidden, residual)
        [T, H] each -> (hidden, residual) after its last layer. kv_caches: one per layer of the stage."""
        # the last position of the longest sequence is max_seq_len - 1 (no device sync to find it)
        if attn_metadata.max_seq_len > self.rotary.max_position:
            raise ValueError(f"position {attn_metadata.max_seq_len - 1} exceeds max_position_embeddings")
        self.rotary.new_step()
        attn_metadata = self.backend.build_metadata(attn_metadata)
        if input_ids is not None:
            assert self.embed_tokens is not None
            hidden = self.embed_tokens(input_ids)
        assert hidden is not None
        stage = self.stage
        for layer, kv_cache in zip(self.layers[stage.layer_start : stage.layer_end], kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        return hidden, residual

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        assert self.norm is not None, "the final norm lives on the last pipeline stage"
        return self.norm(hidden, residual)[0]

    @property
    def head(self) -> VocabParallelEmbedding | None:
        """The head's weights (the embedding when tied); None off the last pipeline stage."""
        if not self.stage.is_last:
            return None
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def pack_for_cpu(self) -> int:
        """oneDNN-packed copies of every decoder linear and of the head (CPU); returns how many were packed."""
        head = self.head
        self.packed_head = None if head is None else pack_weight(head.weight.data)
        return sum(m.pack() for m in self.layers.modules() if isinstance(m, Linear)) + (self.packed_head is not None)

    def process_weights_after_loading(self) -> None:
        """Each decoder linear's method turns its loaded tensors into what it computes with (a repack, an online
        quantization). A format with ``int8_head`` (int4) also gives the head an int8 copy in 32-column groups for
        small batches (GGUF's Q8_0 layout, where checkpoints keep their head: the file's own codes come back) when
        the C++ kernels are built. The dense (oneDNN-packed) head stays beside it for wider batches: the int8-only
        head of a Q8_0 file (its codes, held once) made a 32-sequence decode step ~20 ms slower on a 2-core EPYC
        (int8_group_matmul's tiles: 27 ms for the 49152 x 576 head at 32 rows, against 7.7 ms packed bf16)."""
        for m in self.layers.modules():
            if isinstance(m, Linear):
                m.process_weights_after_loading()
        head = self.head
        if self.quant is None or not self.quant.int8_head or head is None:
            return
        weight = head.weight
        if weight.device.type == "cpu" and weight.shape[1] % 32 == 0 and cpu.load() is not None:
            codes, scales = quantize_int8_groups(weight.data)
            self.int8_head = Int8Groups(codes, scales, None, 32)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits [N, vocab_size] (on every rank: the ranks' vocabulary slices gathered)."""
        head = self.head
        assert head is not None, "the head lives on the last pipeline stage"
        return head.gather_logits(self._local_logits(hidden))

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits of this rank's vocabulary rows [N, per_rank]."""
        if self.int8_head is not None and hidden.shape[0] <= INT4_MAX_ROWS:
            return int8_groups_matmul(hidden.float(), self.int8_head)
        if self.packed_head is not None:
            return packed_linear(hidden, self.packed_head).float()
        assert self.head is not None
        return F.linear(hidden, self.head.weight).float()

    # ---- weights --------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Load Hugging Face-named tensors; every parameter must be covered (else a clear error). A linear takes
        whatever tensors its format has (``weight``, or ``qweight`` / ``scales`` / ...), sliced for its rank."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        fused = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                 "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}  # fmt: skip
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the head (or the head is on another stage)
            if not self._on_this_stage(name):
                continue
            parts = name.split(".")
            if len(parts) >= 3 and parts[-2] in fused:
                module_name, shard = fused[parts[-2]]
                merged = modules.get(".".join([*parts[:-2], module_name]))
                assert isinstance(merged, MergedLinear)
                merged.load_shard(shard, parts[-1], tensor)
                continue
            module = modules.get(".".join(parts[:-1]))
            if isinstance(module, Linear | VocabParallelEmbedding):
                try:  # the module takes its tensor-parallel slice of the whole checkpoint matrix
                    module.load_weight(parts[-1], tensor)
                except ValueError as e:
                    raise ValueError(f"{hf_name}: {e}") from None
                loaded.add(name)
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter in the model")
            param = params[name]
            if isinstance(tensor, CodeGroups):  # a GGUF's K-quant matrix outside the linears
                tensor = tensor.dense(param.dtype)
            if param.shape != tensor.shape:
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
        missing = []
        linear_params: set[str] = set()
        for module_name, module in modules.items():
            if isinstance(module, Linear):
                missing += [f"{module_name}.{m}" for m in module.missing()]
                linear_params.update(f"{module_name}.{p}" for p in module.layouts)
        missing += [n for n in params if n not in loaded and n not in linear_params]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")

    def _on_this_stage(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` (without "model.") belongs to this pipeline stage."""
        first = name.split(".", 1)[0]
        if first == "layers":
            return self.stage.layer_start <= int(name.split(".")[1]) < self.stage.layer_end
        if first == "embed_tokens":
            return self.embed_tokens is not None
        if first == "norm":
            return self.norm is not None
        return True

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights (load_format="dummy"): see :func:`dummy_weights`."""
        self.load_weights(dummy_weights(self.config, seed))


_UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def dummy_weights(config: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """A random checkpoint in Hugging Face names: small normal matrices, unit norms, zero biases, for tests and
    benchmarks. Whole matrices (every tensor-parallel rank draws the same ones and loads its slice), drawn in the
    order of a one-rank model's parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in LlamaForCausalLM(config).named_parameters()]
    d = config.head_dim
    split = {"qkv_proj": [config.num_attention_heads * d, config.num_key_value_heads * d,
                          config.num_key_value_heads * d],
             "gate_up_proj": [config.intermediate_size] * 2}  # fmt: skip
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=gen) * 0.02
        *path, module, param = name.split(".")
        if module in _UNFUSED:
            for part, piece in zip(_UNFUSED[module], tensor.split(split[module]), strict=True):
                yield ".".join(["model", *path, part, param]), piece
        elif name.startswith("lm_head."):
            yield name, tensor
        else:
            yield f"model.{name}", tensor
