"""A draft model for speculative decoding cut from a target's own decoder layers, as a Hugging Face directory with
its tokenizer (the registries carry no smaller SmolLM2): used by the draft-model tests and bench/speculative.py.

SmolLM2-135M's 30 layers but 10..15 (``SMOLLM2_DRAFT_LAYERS``): its guesses are right about a third of the time, so
steps both accept runs and roll back; a draft of its first 6, or even 14, layers agrees with it on almost nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from kubellm.runtime.models.loader import LoadedModel, load_model
from kubellm.runtime.quantization.int4_groups import CodeGroups

SMOLLM2_DRAFT_LAYERS = [i for i in range(30) if not 10 <= i < 16]


def write_layer_subset(loaded: LoadedModel, layers: list[int], directory: Path) -> Path:
    """``loaded`` (its weights an iterable of (Hugging Face name, tensor)) with only ``layers``, renumbered, saved
    in float32 into ``directory`` (created)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hf = {**loaded.hf_config, "num_hidden_layers": len(layers), "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(hf))
    kept = {}
    for name, tensor in loaded.weights or []:
        layer = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if layer is not None:
            if int(layer.group(1)) not in layers:
                continue
            name = f"model.layers.{layers.index(int(layer.group(1)))}.{layer.group(2)}"
        # a GGUF's quantized matrices come as their codes (the loader keeps them for the CPU kernels)
        dense = tensor.dense(torch.float32) if isinstance(tensor, CodeGroups) else tensor.to(torch.float32)
        kept[name] = dense.contiguous()
    save_file(kept, str(directory / "model.safetensors"))
    assert loaded.tokenizer is not None
    loaded.tokenizer.save_pretrained(directory)
    return directory


def write_smollm2_draft(gguf: Path, directory: Path, layers: list[int] = SMOLLM2_DRAFT_LAYERS) -> Path:
    """The bundled SmolLM2 file's ``layers`` as a draft directory."""
    return write_layer_subset(load_model(str(gguf)), layers, directory)
