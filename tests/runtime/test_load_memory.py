"""Loading builds the model straight into its dtype on its device: the peak memory of a load is the model's own
bytes plus one checkpoint tensor in flight, not a float32 copy of the model and then its cast.

Measured in fresh subprocesses by the RSS high-water mark (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs just before the load, after the imports both ways share; tracemalloc cannot see torch's
allocations). The checkpoint is a
random bfloat16 Llama saved by transformers in small safetensors shards. The same measurement of the old way
(build in float32, then cast) exceeds the bound, so the bound can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# one checkpoint tensor in flight (the largest: the 8 MB embedding), its memory-mapped shard file, allocator slack
CONSTANT_BYTES = 24 << 20

MEASURE = """
import json, re, sys, torch
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend
from kubellm.runtime.models.build import build_model
from kubellm.runtime.models.llama import LlamaForCausalLM
from kubellm.runtime.models.loader import load_model

def status(key):
    return int(re.search(rf"{key}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

loaded = load_model(sys.argv[1])  # the configuration now, the weights lazily
backend, cpu = TorchAttentionBackend(), torch.device("cpu")
# interpreter state both ways pay once, before the mark: torch's meta-device machinery is imported on first use
# (about 150 MiB of Python modules), and the first bfloat16 copy
with torch.device("meta"):
    LlamaForCausalLM(loaded.config, backend).to(torch.bfloat16)
torch.empty(8, dtype=torch.bfloat16).copy_(torch.ones(16, dtype=torch.bfloat16).narrow(0, 0, 8))
# the first meta -> CPU materialization (what to_empty does) costs ~33 MiB of anonymous memory once per process,
# whatever the tensor's size (torch initializes its Python meta-dispatch path): interpreter state, not the load's
torch.empty_like(torch.empty(8, dtype=torch.bfloat16, device="meta"), device="cpu")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current RSS
base = status("VmRSS")
if sys.argv[2] == "direct":
    model = build_model(loaded.config, loaded.weights, backend=backend, device=cpu, dtype=torch.bfloat16)
else:  # the old way: float32 on the device, load, then cast
    model = LlamaForCausalLM(loaded.config, backend)
    model.load_weights(loaded.weights)
    model = model.to(torch.bfloat16)
peak = status("VmHWM") - base
size = sum(p.numel() * p.element_size() for p in model.parameters())
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(json.dumps({"peak": peak, "size": size}))
"""


def measure(checkpoint: Path, how: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), how], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)")
def test_peak_memory_of_a_load_is_the_model_plus_a_constant(tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="4MB")

    direct = measure(tmp_path, "direct")
    bound = int(direct["size"] * 1.1) + CONSTANT_BYTES
    print(
        f"model {direct['size'] / 2**20:.1f} MiB; load peak {direct['peak'] / 2**20:.1f} MiB; bound {bound / 2**20:.1f}"
    )
    assert direct["peak"] <= bound

    old = measure(tmp_path, "float32-then-cast")
    print(f"the old way: load peak {old['peak'] / 2**20:.1f} MiB")
    assert old["peak"] > bound  # the measurement sees the difference
