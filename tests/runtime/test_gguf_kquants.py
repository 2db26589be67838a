"""GGUF K-quants (Q4_K, Q5_K, Q6_K): our decoders against ``gguf.quants.dequantize`` (the independent reference),
and a K-quant mix of SmolLM2 written here (Q4_K, Q5_K and Q6_K down projections) that loads and serves with its
Q4_K linears kept int4 and its Q5_K / Q6_K ones int8 groups from the file's own codes, against transformers reading
the same file (the oracle, float32)."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from transformers_oracle import greedy_reference

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.engine.model_runner import resolve_quantization
from kubellm.runtime.layers.linear import Linear, MergedLinear
from kubellm.runtime.models.gguf import int8_groups_of
from kubellm.runtime.models.gguf_blocks import KQUANT_BLOCKS, decode_q4_k, dequantize_kquant
from kubellm.runtime.models.gguf_quantize import (
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
    use_more_bits,
    write_q4_k_m_copy,
)
from kubellm.runtime.models.loader import load_model
from kubellm.runtime.quantization.cpu_int4 import Int4CpuConfig, Int4CpuMethod
from kubellm.runtime.quantization.int4_groups import Int4Groups
from kubellm.runtime.quantization.int8_groups import Int8Groups
from kubellm.runtime.quantization.registry import quant_config_for
from kubellm.runtime.sampling_params import SamplingParams

CPU = torch.device("cpu")
# f16 scale offsets per block: random bytes are valid blocks except NaN/inf scales (exponent bits all ones)
F16_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_blocks(rng: np.random.Generator, type_name: str, num_blocks: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=(num_blocks, KQUANT_BLOCKS[type_name][1]), dtype=np.uint8)
    for offset in F16_OFFSETS[type_name]:
        raw[:, offset + 1] &= 0xBF  # the top exponent bit off: finite
    return raw


def bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).reshape(-1).view(np.uint32)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_decoders_equal_gguf_bit_for_bit(type_name: str) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    for num_blocks in (1, 3, int(rng.integers(1, 200)) | 1):  # odd numbers of blocks
        raw = random_blocks(rng, type_name, num_blocks)
        reference = quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
        ours = dequantize_kquant(raw.reshape(-1), type_name)
        assert ours.dtype == torch.float32 and ours.numel() == num_blocks * 256
        np.testing.assert_array_equal(bits(ours.numpy()), bits(reference))
    # Q4_K's codes and sub-block scales, as an int4 layer takes them, give the same values
    raw = random_blocks(rng, "Q4_K", 6)
    codes, scale, minimum = decode_q4_k(raw.reshape(-1))
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    groups = Int4Groups(codes.reshape(3, 512), scale.reshape(3, 16), minimum.reshape(3, 16))
    reference = quants.dequantize(raw.reshape(3, -1), gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(bits(groups.dense().numpy()), bits(reference))


@pytest.mark.parametrize(("type_name", "group_size", "low", "high"), [("Q6_K", 16, -32, 31), ("Q5_K", 32, 0, 31)])
def test_q6_k_and_q5_k_as_int8_groups_equal_gguf(type_name: str, group_size: int, low: int, high: int) -> None:
    """A Q6_K / Q5_K matrix as the int8 groups a layer keeps (codes, scales[, offsets]): the same numbers as
    gguf.quants.dequantize, bit for bit, and codes in the format's range (no re-rounding)."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    rows, blocks_per_row = 3, 2
    raw = random_blocks(rng, type_name, rows * blocks_per_row).reshape(rows, -1)
    groups = int8_groups_of(raw.reshape(-1), type_name, (rows, blocks_per_row * 256))
    assert isinstance(groups, Int8Groups) and groups.group_size == group_size
    assert groups.codes.dtype == torch.int8 and low <= int(groups.codes.min()) and int(groups.codes.max()) <= high
    assert (groups.offset is None) == (type_name == "Q6_K")
    assert tuple(groups.scale.shape) == (rows, blocks_per_row * 256 // group_size)
    reference = quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(bits(groups.dense().numpy()), bits(reference))


@pytest.mark.parametrize(("type_name", "quantize", "sub_block", "levels"), [
    ("Q4_K", quantize_q4_k, 32, 15), ("Q5_K", quantize_q5_k, 32, 31), ("Q6_K", quantize_q6_k, 16, 62),
])  # fmt: skip
def test_test_side_quantizers_write_valid_blocks(type_name: str, quantize, sub_block: int, levels: int) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((5, 3 * 256)) * rng.uniform(0.01, 3)).astype(np.float32)  # 15 blocks
    back = quants.dequantize(quantize(values), gguf.GGMLQuantizationType[type_name])
    assert back.shape == values.shape
    groups = values.reshape(-1, sub_block)
    asymmetric = type_name != "Q6_K"
    low = np.minimum(groups.min(-1), 0) if asymmetric else -np.abs(groups).max(-1)
    high = groups.max(-1) if asymmetric else np.abs(groups).max(-1)
    step = (high - low) / levels  # the format's step per sub-block (before its scales are rounded)
    error = np.abs(back - values).reshape(-1, sub_block).max(-1)
    assert (error <= step * 0.75 + 1e-6).all(), float((error / step).max())


# --------------------------------------------------------------------------------- a Q4_K_M SmolLM2


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("q4km") / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    return path, write_q4_k_m_copy(smollm2_gguf_path, path, base=("Q4_K", "Q5_K"))  # every K-quant in one file


@pytest.fixture(scope="module")
def hf_q4_k_m(q4_k_m: tuple[Path, dict[str, str]]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = q4_k_m[0]
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def engine_for(path: Path, quantization: str) -> LLMEngine:
    config = EngineConfig(
        model=str(path), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20, quantization=quantization
    )
    return LLMEngine(config)


def prefill_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    from .test_model_hf import our_logits

    return our_logits(engine, ids)


def test_the_q4_k_m_file_is_a_mix(q4_k_m: tuple[Path, dict[str, str]]) -> None:
    path, types = q4_k_m
    downs = {name: kind for name, kind in types.items() if name.endswith("ffn_down.weight")}
    assert set(downs.values()) == {"Q4_K", "Q5_K", "Q6_K"}
    assert all((kind == "Q6_K") == use_more_bits(int(n.split(".")[1]), 30) for n, kind in downs.items())
    loaded = load_model(str(path))
    assert loaded.weight_formats == frozenset({"Q4_1", "Q4_K", "Q5_K", "Q6_K"})
    # auto keeps a Q4_K_M file quantized where the int4 kernel is fast, dense where it is not
    assert resolve_quantization("auto", CPU, loaded.weight_formats, int4_fast=True) == "int4"
    assert resolve_quantization("auto", CPU, loaded.weight_formats, int4_fast=False) == "none"
    # Q5_K_M: int8 groups only, our kernel (vectorized for AVX2 too): quantized whatever the int4 kernel's speed
    for fast in (True, False):
        assert resolve_quantization("auto", CPU, frozenset({"Q5_K", "Q6_K"}), int4_fast=fast) == "int4"
    assert resolve_quantization("auto", CPU, frozenset({"Q4_K"}), int4_fast=True) == "int4"
    assert resolve_quantization("auto", CPU, frozenset({"Q4_K", "Q3_K"}), int4_fast=True) == "none"  # Q3_K_M
    # int4 over the mix: its dense layers only where nothing is lost (Q4_1 yes, Q6_K no); any other file: all
    mix = quant_config_for("int4", loaded.hf_config, loaded.weight_formats)
    assert isinstance(mix, Int4CpuConfig) and mix.lossless_only
    plain = quant_config_for("int4", {}, frozenset({"Q8_0"}))
    assert isinstance(plain, Int4CpuConfig) and not plain.lossless_only
    weights = dict(loaded.weights or ())
    down = weights[f"model.layers.{layer_of(types, 'Q4_K')}.mlp.down_proj.weight"]
    assert isinstance(down, Int4Groups) and tuple(down.shape) == (576, 1536)
    six = weights["model.layers.2.mlp.down_proj.weight"]  # Q6_K: int8 groups of 16, no offsets
    assert isinstance(six, Int8Groups) and six.group_size == 16 and six.offset is None
    five = weights[f"model.layers.{layer_of(types, 'Q5_K')}.mlp.down_proj.weight"]
    assert isinstance(five, Int8Groups) and five.group_size == 32 and five.offset is not None


def layer_of(types: dict[str, str], kind: str) -> int:
    """The first layer whose ffn_down the file stores as ``kind``."""
    return min(int(n.split(".")[1]) for n, t in types.items() if n.endswith("ffn_down.weight") and t == kind)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int4", "none"])
def test_q4_k_m_serves_like_transformers(
    quantization: str, q4_k_m: tuple[Path, dict[str, str]], hf_q4_k_m: torch.nn.Module
) -> None:
    """int4: the Q4_K down projections int4 from the file's codes, the Q5_K / Q6_K ones int8 groups from theirs,
    the Q4_1 layers int4 from theirs (requantizing them finds them again); none: everything dequantized. Float32
    activations both ways. Bounds: both compute with the file's numbers (the int4 kernel rounds nothing in float32,
    the int8 group kernel decodes ``fma(q, scale, offset)`` instead of the reference's two roundings), so only
    float accumulation order separates them from transformers: 5e-4 on logits of magnitude ~20 (about 7x the
    measured 7e-5, for other ISAs' summation orders; a re-rounded code would move a logit by ~1e-2), the same
    argmax at every position, and the same 16 greedy tokens."""
    path, types = q4_k_m
    engine = engine_for(path, quantization)
    linears = {n: m for n, m in engine.model.named_modules() if isinstance(m, Linear)}
    for layer in range(30):
        down = linears[f"layers.{layer}.mlp.down_proj"].method
        file_type = types[f"blk.{layer}.ffn_down.weight"]
        if quantization == "int4":
            assert isinstance(down, Int4CpuMethod) and down.from_file_codes
            assert (down.int4_weight is not None) == (file_type == "Q4_K")
            assert (down.int8_groups is not None) == (file_type != "Q4_K")
            if file_type != "Q4_K":  # what the layer reports
                want = "int8 groups of 16 (file codes)" if file_type == "Q6_K" else "int8 groups of 32 with offsets"
                assert want in repr(linears[f"layers.{layer}.mlp.down_proj"])
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
                method = linears[f"layers.{layer}.{name}"].method
                assert isinstance(method, Int4CpuMethod) and method.int4_weight is not None, name
        else:
            assert not isinstance(down, Int4CpuMethod)
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    ids = tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")
    ours = prefill_logits(engine, ids)
    with torch.inference_mode():
        ref = hf_q4_k_m(torch.tensor([ids])).logits[0].float()
    diff = (ours - ref).abs().max().item()
    print(f"{quantization}: max |logit difference| vs transformers over {len(ids)} positions: {diff:.2e}")
    assert diff < 5e-4  # measured 7e-5 (int4) and 6e-5 (none) on AVX-512: room for other accumulation orders
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # greedy continuation through the whole engine (paged decode, the int8 head) equals transformers' greedy
    engine.add_request("r", ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    ours_tokens = [t for out in outputs for c in out.outputs for t in c.token_ids]  # each step's new tokens
    assert ours_tokens == greedy_reference(hf_q4_k_m, ids, 16)


def q4_k_groups(gen: torch.Generator, rows: int, cols: int) -> tuple[Int4Groups, torch.Tensor]:
    values = torch.randn(rows, cols, generator=gen)
    raw = torch.from_numpy(quantize_q4_k(values.numpy()).reshape(-1))
    codes, scale, minimum = decode_q4_k(raw)
    groups = Int4Groups(codes.reshape(rows, cols), scale.reshape(rows, -1), minimum.reshape(rows, -1))
    return groups, groups.dense()


def q6_k_groups(gen: torch.Generator, rows: int, cols: int) -> Int8Groups:
    values = torch.randn(rows, cols, generator=gen)
    return int8_groups_of(quantize_q6_k(values.numpy()).reshape(-1), "Q6_K", (rows, cols))


def test_an_int4_layer_holds_q4_k_codes_never_a_dense_copy(gen: torch.Generator) -> None:
    """A merged layer loaded from Q4_K shards holds only their codes until the last one is in, then the packed int4
    weight: no [N, K] float tensor at any point. Q4_K beside Q6_K: int8 groups. Mixed with a dense shard it is
    assembled dense (exactly)."""
    (a, wa), (b, wb) = q4_k_groups(gen, 48, 512), q4_k_groups(gen, 16, 512)
    layer = MergedLinear(512, {"a": 48, "b": 16}, quant=Int4CpuConfig(lossless_only=True))
    layer.load_shard("a", "weight", a)
    assert layer.weight is not None and layer.weight.numel() == 0  # the placeholder: nothing dense allocated
    layer.load_shard("b", "weight", b)
    assert layer.weight is None and "int4 (file codes)" in repr(layer)
    layer.process_weights_after_loading()  # already done: a no-op
    x = torch.randn(5, 512, generator=gen)
    torch.testing.assert_close(layer(x), x @ torch.cat([wa, wb]).t(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="loaded twice"):
        layer.load_shard("a", "weight", torch.zeros(48, 512))

    six = q6_k_groups(gen, 16, 512)
    with_q6 = MergedLinear(512, {"a": 48, "b": 16}, quant=Int4CpuConfig(lossless_only=True))
    with_q6.load_shard("a", "weight", a)  # Q4_K q beside a Q6_K v: int8 groups of 16 with offsets, no dense copy
    with_q6.load_shard("b", "weight", six)
    assert with_q6.weight is None and "int8 groups of 16 with offsets (file codes)" in repr(with_q6)
    for rows in (1, 5, 17):
        x = torch.randn(rows, 512, generator=gen)
        torch.testing.assert_close(with_q6(x), x @ torch.cat([wa, six.dense()]).t(), rtol=1e-4, atol=1e-4)

    mixed = MergedLinear(512, {"a": 48, "b": 16}, quant=Int4CpuConfig(lossless_only=True))
    mixed.load_shard("a", "weight", a)
    mixed.load_shard("b", "weight", wb + 0.001)  # a Q6_K-like shard: more than 4 bits
    mixed.process_weights_after_loading()
    assert mixed.weight is not None and "int4" not in repr(mixed)
    assert torch.equal(mixed.weight.data, torch.cat([wa, wb + 0.001]))


def test_a_dense_layer_of_a_mix_becomes_int4_only_where_nothing_is_lost(gen: torch.Generator) -> None:
    from .test_quantization import q4_1_weight

    exact, finer = q4_1_weight(32, 64, gen), torch.randn(32, 64, generator=gen)
    for weight, int4 in ((exact, True), (finer, False)):
        layer = Linear(64, 32, quant=Int4CpuConfig(lossless_only=True))
        layer.load_weight("weight", weight)
        layer.process_weights_after_loading()
        assert (layer.weight is None) is int4
    layer = Linear(64, 32, quant=Int4CpuConfig())  # not a mix: quantized whatever it loses
    layer.load_weight("weight", finer)
    layer.process_weights_after_loading()
    assert layer.weight is None


def test_a_q4_k_layer_loads_dense_into_a_dense_model(gen: torch.Generator) -> None:
    groups, dense = q4_k_groups(gen, 16, 256)
    layer = Linear(256, 16)
    layer.load_weight("weight", groups)
    assert layer.weight is not None and torch.equal(layer.weight.data, dense)


def test_tensor_parallel_shards_take_their_slice_of_the_codes(gen: torch.Generator) -> None:
    """A column-parallel shard takes its rows of the file's codes, a row-parallel one its columns (whole groups)."""
    groups, dense = q4_k_groups(gen, 48, 512)
    x = torch.randn(3, 512, generator=gen)
    column = MergedLinear(512, {"a": 16}, shard_rows={"a": (16, 48)}, quant=Int4CpuConfig(lossless_only=True))
    column.load_shard("a", "weight", groups)
    assert "int4 (file codes)" in repr(column)
    torch.testing.assert_close(column(x), x @ dense[16:32].t(), rtol=1e-4, atol=1e-4)
    row = Linear(256, 48, input_slice=(256, 512), quant=Int4CpuConfig(lossless_only=True))
    row.load_weight("weight", groups)
    half = x[:, 256:].contiguous()
    torch.testing.assert_close(row(half), half @ dense[:, 256:].t(), rtol=1e-4, atol=1e-4)
    odd = Linear(240, 48, input_slice=(16, 512), quant=Int4CpuConfig(lossless_only=True))
    with pytest.raises(ValueError, match=r"weight: columns \[16, 256\) are not whole groups of 32"):
        odd.load_weight("weight", groups)
    with pytest.raises(ValueError, match=r"weight: checkpoint has shape \(48, 512\), expected \(16, 512\)"):
        Linear(512, 16, quant=Int4CpuConfig()).load_weight("weight", groups)


def test_a_q8_0_embedding_comes_as_its_codes_and_loads_as_gguf_dequantizes_it(gen: torch.Generator) -> None:
    """A Q8_0 embedding reaches the model as the file's codes (Int8Groups), which the embedding dequantizes as gguf
    does: its lookups equal gguf's numbers bit for bit."""
    from kubellm.runtime.distributed.parallel import TensorParallel
    from kubellm.runtime.layers.vocab_parallel import VocabParallelEmbedding
    from kubellm.runtime.models.gguf import q8_0_groups_of

    values = torch.randn(70, 64, generator=gen).numpy()
    raw = quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    groups = q8_0_groups_of(raw.reshape(-1), (70, 64))
    reference = torch.from_numpy(quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(70, 64))
    np.testing.assert_array_equal(bits(groups.dense().numpy()), bits(reference.numpy()))
    ids = torch.randint(0, 70, (9,), generator=gen)
    dense = VocabParallelEmbedding(70, 64, TensorParallel.single())
    dense.load_weight("weight", groups)
    assert dense.weight is not None and torch.equal(dense.weight.data, reference)
    assert torch.equal(dense(ids), reference[ids])
