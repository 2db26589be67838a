"""The quantized-linear interface: a format is a :class:`QuantConfig` (read from ``config.json``'s
``quantization_config`` or chosen by ``--quantization``) that gives every linear layer a :class:`LinearMethod`.

vLLM's LinearMethod idea: the method creates the layer's weight tensors (:meth:`LinearMethod.create_weights`,
each with a :class:`ParamLayout` saying how it maps onto the logical ``[out_features, in_features]`` matrix),
the layer loads checkpoint tensors into them generically (tensor-parallel column and row slices of packed tensors
and their scales come from the layouts, see ``layers/linear.py``), then the method turns them into the one
representation it computes with (:meth:`LinearMethod.process_weights_after_loading`: a repack, an online
quantization, a oneDNN reorder) and applies it (:meth:`LinearMethod.apply`). Nothing outside a method branches on
the format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..layers.linear import Linear
    from .int4_groups import Int4Groups
    from .int8_groups import Int8Groups


@dataclass(frozen=True)
class ParamLayout:
    """Where a weight tensor's dimensions sit in the logical ``[out_features, in_features]`` matrix.

    ``out_dim`` / ``in_dim``: the tensor's dimension that runs along the output rows / input columns (None: the
    tensor does not follow that axis and is loaded whole, e.g. replicated scales). ``out_pack`` / ``in_pack``:
    logical rows (columns) per element along that dimension: 8 for int4 codes packed in int32 words, the group
    size for per-group scales, 1 for a plain matrix. A shard of the matrix starting at row ``s`` of ``r`` rows
    is the tensor's elements ``s / out_pack .. (s + r) / out_pack`` along ``out_dim``; both must divide."""

    out_dim: int | None
    in_dim: int | None
    out_pack: int = 1
    in_pack: int = 1


class LinearMethod(ABC):
    """How one linear layer stores and multiplies its weight. One instance per layer (it may keep state)."""

    @abstractmethod
    def create_weights(self, layer: Linear) -> None:
        """Register the checkpoint tensors of ``layer`` (shapes from ``layer.in_features`` / ``out_features``)
        with ``layer.add_weight(name, tensor, layout)``. Called on the meta device at model construction."""

    def ignores(self, layer: Linear, param: str, tensor: torch.Tensor) -> bool:
        """Whether a checkpoint tensor named ``param`` that the layer lacks is accepted and dropped (GPTQ files
        carry a bias per linear and a g_idx even when unused)."""
        return False

    def prepare_load(self, layer: Linear, param: str) -> None:  # noqa: B027 (optional hook)
        """Called before a checkpoint tensor is copied into ``param`` (online formats allocate it here, lazily)."""

    def checkpoint_tensor(self, layer: Linear, shard: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor ``param`` of ``shard`` in the shape its layout expects (FP8 files store a
        per-tensor scale as ``[]`` or ``[1]`` and a per-channel one as ``[N, 1]``; their methods hold ``[N]``)."""
        return tensor

    def after_load(self, layer: Linear) -> None:  # noqa: B027 (optional hook)
        """Called after each checkpoint tensor is copied in (online formats quantize as soon as all are in)."""

    def takes_code_groups(self, layer: Linear, param: str) -> bool:
        """Whether ``param`` may arrive as a GGUF file's codes (:class:`Int4Groups`, :class:`Int8Groups`) rather
        than dense."""
        return False

    def load_code_groups(self, layer: Linear, shard: str, groups: Int4Groups | Int8Groups) -> None:
        """Take this layer's slice of the codes of ``shard`` (only called where :meth:`takes_code_groups`)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Linear) -> None:  # noqa: B027 (optional hook)
        """Turn the loaded tensors into the representation :meth:`apply` uses (repack, quantize, drop copies)."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [M, in_features] -> x @ W.T [M, out_features] in x's dtype, without the bias."""

    def describe(self) -> str:
        """A few words for the layer's repr."""
        return ""


class QuantConfig(ABC):
    """A quantization format with its settings. ``name``: vLLM's ``quant_method`` name (the registry key)."""

    name: ClassVar[str]
    int8_head: ClassVar[bool] = False  # whether the head also gets an int8 copy for small CPU batches (int4)
    from_checkpoint: ClassVar[bool] = False  # the checkpoint holds the quantized tensors (else: quantized at load)

    @abstractmethod
    def linear_method(self) -> LinearMethod:
        """A fresh method for one decoder linear (the embedding, norms and head stay unquantized)."""

    def linear_method_for(self, names: tuple[str, ...]) -> LinearMethod | None:
        """The method of the decoder linear that holds the checkpoint matrices ``names`` (Hugging Face module
        names, one per merged shard: ``model.layers.0.self_attn.q_proj``, ...; empty where unknown), or None
        where the checkpoint leaves that linear unquantized (its ignore list): a plain matrix then."""
        return self.linear_method()

    def check_device(self, device: torch.device) -> None:  # noqa: B027 (optional check)
        """Raise ValueError naming the setting when this format cannot run on ``device``."""

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> QuantConfig:
        """From ``config.json``'s ``quantization_config`` (empty for online formats); ValueError naming a field
        whose value is unsupported."""
        return cls()
