"""AWQ and GPTQ packing: known integer weights packed per the published layouts (quant_testing.py, written apart
from the loader) load into our linears, whose dequantized weights equal them exactly; the same through
tensor-parallel row and column slices; and the settings we refuse, each a clear error naming its field."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from quantization.quant_testing import IntWeight, awq_tensors, gptq_tensors, rtn_quantize

from kubellm.runtime.engine.model_runner import resolve_quantization
from kubellm.runtime.layers.linear import Linear, MergedLinear
from kubellm.runtime.quantization import w4
from kubellm.runtime.quantization.awq import AWQConfig
from kubellm.runtime.quantization.base import QuantConfig
from kubellm.runtime.quantization.gptq import GPTQConfig
from kubellm.runtime.quantization.registry import quant_config_for
from kubellm.runtime.quantization.w4 import W4Method

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The W4 layout stays in place (an AVX-512 CPU would repack it for torch's int4 kernel: tested below)."""
    monkeypatch.setattr(w4, "cpu_int4_is_fast", lambda: False)


@pytest.fixture
def seed() -> int:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return seed


def known_weight(k: int, n: int, group_size: int, seed: int, *, sym: bool, act_order: bool = False) -> IntWeight:
    """Integer codes and zero points drawn directly (not from a float weight), every code 0..15 used."""
    rng = np.random.default_rng(seed)
    g = k if group_size == -1 else group_size
    codes = rng.integers(0, 16, size=(k, n))
    codes[0, :], codes[1, :] = 0, 15
    zeros = np.full((k // g, n), 8) if sym else rng.integers(1, 16, size=(k // g, n))
    scales = torch.from_numpy(rng.uniform(1e-3, 2e-2, size=(k // g, n))).half()
    order = rng.permutation(k) if act_order else np.arange(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // g
    return IntWeight(codes, zeros, scales, g_idx)


def load(layer: Linear, tensors: dict[str, torch.Tensor]) -> Linear:
    for name, tensor in tensors.items():
        layer.load_weight(name, tensor)
    assert layer.missing() == []
    layer.process_weights_after_loading()
    return layer


def dequantized(layer: Linear) -> torch.Tensor:
    """The layer's weight as [N, K] float32."""
    assert isinstance(layer.method, W4Method) and layer.method.w4 is not None
    return layer.method.w4.dequantize().t()


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_dequantizes_to_the_packed_integers(seed: int, group_size: int) -> None:
    iw = known_weight(128, 48, group_size, seed, sym=False)
    layer = load(Linear(128, 48, quant=AWQConfig(group_size)), awq_tensors(iw))
    assert torch.equal(dequantized(layer), iw.dense())
    assert all(getattr(layer, name) is None for name in ("qweight", "qzeros", "scales"))  # held once: repacked
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(layer(x), x @ iw.dense().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("sym", "desc_act", "group_size"),
    [(True, False, 32), (False, False, 32), (True, True, 32), (False, True, 16), (False, False, -1)],
)
def test_gptq_dequantizes_to_the_packed_integers(seed: int, sym: bool, desc_act: bool, group_size: int) -> None:
    iw = known_weight(128, 40, group_size, seed, sym=sym, act_order=desc_act)
    config = GPTQConfig.from_config({"bits": 4, "group_size": group_size, "sym": sym, "desc_act": desc_act})
    layer = load(Linear(128, 40, quant=config), gptq_tensors(iw, with_bias=40))
    assert torch.equal(dequantized(layer), iw.dense())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(layer(x), x @ iw.dense().t(), rtol=1e-5, atol=1e-5)


def test_gptq_refuses_a_nonzero_bias_the_model_does_not_have(seed: int) -> None:
    iw = known_weight(64, 16, 32, seed, sym=True)
    tensors = gptq_tensors(iw, with_bias=16)
    tensors["bias"][3] = 0.5
    with pytest.raises(ValueError, match="nonzero bias"):
        load(Linear(64, 16, quant=GPTQConfig(32)), tensors)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(AWQConfig(32), id="awq"),
        pytest.param(GPTQConfig(32, desc_act=False, sym=False), id="gptq"),
        pytest.param(GPTQConfig(32, desc_act=True, sym=False), id="gptq-act-order"),
    ],
)
def test_tensor_parallel_slices_of_packed_tensors(seed: int, config: QuantConfig) -> None:
    """A row-parallel half (columns of W: input rows of the packed codes, their groups' scales) and a
    column-parallel merged layer (output rows: packed columns, zeros and scales), each equal to that slice."""
    act_order = isinstance(config, GPTQConfig) and config.desc_act
    full = [known_weight(128, 64, 32, seed + i, sym=False, act_order=act_order) for i in range(2)]
    full[1].g_idx = full[0].g_idx  # merged shards share their input, so one act order (GPTQ's q/k/v, gate/up)
    pack = awq_tensors if isinstance(config, AWQConfig) else gptq_tensors
    # row-parallel rank 1 of 2: columns 64..127
    row = load(Linear(64, 64, input_slice=(64, 128), quant=config), pack(full[0]))
    assert torch.equal(dequantized(row), full[0].dense()[:, 64:])
    # column-parallel rank 1 of 2 of a merged (a: 64 rows, b: 64 rows) layer: rows 32..63 of each
    merged = MergedLinear(128, {"a": 32, "b": 32}, shard_rows={"a": (32, 64), "b": (32, 64)}, quant=config)
    for shard, iw in zip(("a", "b"), full, strict=True):
        for name, tensor in pack(iw).items():
            merged.load_shard(shard, name, tensor)
    assert merged.missing() == []
    merged.process_weights_after_loading()
    expected = torch.cat([full[0].dense()[32:64], full[1].dense()[32:64]])
    assert torch.equal(dequantized(merged), expected)


def test_merged_shards_with_different_act_orders_are_refused(seed: int) -> None:
    config = GPTQConfig(32, desc_act=True)
    a, b = (known_weight(64, 16, 32, seed + i, sym=True, act_order=True) for i in range(2))
    layer = MergedLinear(64, {"a": 16, "b": 16}, quant=config)
    for name, tensor in gptq_tensors(a).items():
        layer.load_shard("a", name, tensor)
    with pytest.raises(ValueError, match="g_idx: differs between the shards"):
        layer.load_shard("b", "g_idx", gptq_tensors(b)["g_idx"])


def test_a_slice_that_splits_a_group_is_refused(seed: int) -> None:
    with pytest.raises(ValueError, match="does not fit group_size 64"):
        Linear(32, 16, input_slice=(32, 128), quant=GPTQConfig(64))  # 32 columns of 64-column groups
    with pytest.raises(ValueError, match="does not fit"):
        Linear(128, 4, quant=AWQConfig(64))  # 4 output columns of an 8-column packed word
    # a shard offset inside a packed word: rows 4..11 of 16
    iw = known_weight(128, 16, 64, seed, sym=True)
    layer = MergedLinear(128, {"a": 8}, shard_rows={"a": (4, 16)}, quant=AWQConfig(64))
    with pytest.raises(ValueError, match="not whole units of 8"):
        layer.load_shard("a", "qweight", awq_tensors(iw)["qweight"])


def test_rtn_quantizer_round_trips_within_half_a_step(seed: int) -> None:
    """The test's own quantizer (used to build checkpoints) is sane: |W - dequant| <= scale / 2."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(seed)) * 0.05
    for sym in (True, False):
        iw = rtn_quantize(w, 16, sym=sym, act_order=not sym, seed=seed)
        step = iw.scales.float()[torch.from_numpy(iw.g_idx).long()].t()  # [N, K]
        assert bool(((iw.dense() - w).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"quant_method": "awq", "bits": 8}, r"'quantization_config\.bits' is 8"),
        ({"quant_method": "gptq", "bits": 3}, r"'quantization_config\.bits' is 3"),
        ({"quant_method": "awq", "version": "gemv"}, r"'quantization_config\.version' is 'gemv'"),
        ({"quant_method": "awq", "zero_point": False}, r"'quantization_config\.zero_point' is false"),
        ({"quant_method": "gptq", "group_size": 12}, r"'quantization_config\.group_size' \(12\)"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, r"'quantization_config\.checkpoint_format'"),
        ({"quant_method": "gptq", "desc_act": "yes"}, r"'quantization_config\.desc_act' must be true or false"),
        ({"quant_method": "bitsandbytes"}, r"'quantization_config\.quant_method' is 'bitsandbytes'"),
        ({"quant_method": "awq", "modules_to_not_convert": ["mlp.down_proj"]}, r"'quantization_config\.modules_to_not"),
        ({"quant_method": "gptq", "lm_head": True}, r"'quantization_config\.lm_head' is true"),
    ],
)
def test_unsupported_settings_are_errors_naming_the_field(qc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quant_config_for(str(qc["quant_method"]), {"quantization_config": qc})


def test_the_format_follows_the_checkpoint_and_a_mismatch_is_refused() -> None:
    awq = {"quantization_config": {"quant_method": "AWQ", "bits": 4, "group_size": 64}}
    assert resolve_quantization("auto", CPU, frozenset(), checkpoint_method="awq") == "awq"
    config = quant_config_for("awq", awq)
    assert isinstance(config, AWQConfig) and config.group_size == 64
    with pytest.raises(ValueError, match=r"quantization 'gptq' does not match .*'quantization_config.quant_method' is"):
        quant_config_for("gptq", awq)
    with pytest.raises(ValueError, match="does not match"):
        quant_config_for("int8", awq)  # online quantization of an already quantized checkpoint
    with pytest.raises(ValueError, match=r"quantization 'awq' needs a checkpoint quantized so"):
        quant_config_for("awq", {})
    assert quant_config_for("none", {}) is None
    quiet = {"quant_method": "awq", "modules_to_not_convert": None, "lm_head": False}
    assert isinstance(quant_config_for("awq", {"quantization_config": quiet}), AWQConfig)


@pytest.mark.parametrize(
    "config",
    [pytest.param(AWQConfig(32), id="awq"), pytest.param(GPTQConfig(64, sym=False), id="gptq-asym")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_int4_kernel_path_computes_the_same(
    monkeypatch: pytest.MonkeyPatch, seed: int, config: QuantConfig, dtype: torch.dtype
) -> None:
    """Where torch's CPU int4 kernel is fast (AVX-512), the W4 weights are repacked into its layout once more
    (zero' = (8 - zero) * scale); it runs (slowly) on any CPU, so forced here."""
    monkeypatch.setattr(w4, "cpu_int4_is_fast", lambda: True)
    iw = known_weight(128, 48, 32 if isinstance(config, AWQConfig) else 64, seed, sym=False)
    pack = awq_tensors if isinstance(config, AWQConfig) else gptq_tensors
    layer = Linear(128, 48, quant=config).to(dtype)
    layer = load(layer, pack(iw))
    assert isinstance(layer.method, W4Method) and layer.method.int4pack is not None and layer.method.w4 is None
    assert "cpu-int4pack" in repr(layer)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(seed)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(layer(x).float(), x.float() @ iw.dense().t(), rtol=tol, atol=tol)
