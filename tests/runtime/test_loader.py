"""Model loading: Hugging Face directories, GGUF files (the bundled SmolLM2 and GGUFs written here), dummy
loads, dequantization, and the errors bad input gets."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from kubellm.runtime.models import gguf as kgguf
from kubellm.runtime.models import loader
from kubellm.runtime.models.config import ModelConfig
from kubellm.runtime.models.loader import PRESETS, load_model
from kubellm.runtime.progress import Progress
from kubellm.runtime.quantization.int4_groups import CodeGroups

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def _transformers_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ Hugging Face directories


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_directory_matches_transformers(tiny_model_dir, arch: str) -> None:
    directory = tiny_model_dir(arch)
    loaded = load_model(str(directory))
    assert isinstance(loaded.weights, Iterator)
    ours = dict(loaded.weights)
    theirs = _transformers_state_dict(directory)
    if loaded.config.tie_word_embeddings:
        # transformers lists the tied head; checkpoints (and we) do not
        assert "lm_head.weight" not in ours
        theirs.pop("lm_head.weight")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name

    hf = json.loads((directory / "config.json").read_text())
    config = loaded.config
    assert config.model_type == arch
    assert (config.hidden_size, config.num_hidden_layers) == (hf["hidden_size"], hf["num_hidden_layers"])
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.qk_norm == (arch == "qwen3")
    assert config.attention_bias == (arch == "qwen2")
    assert config.head_dim == (32 if arch == "qwen3" else 16)
    assert config.rope_theta == hf["rope_parameters"]["rope_theta"]
    assert config.eos_token_ids == (2,)
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token_ids == {2}
    assert loaded.generation_config["eos_token_id"] == 2
    assert loaded.name == directory.name


def test_llama3_rope_scaling_from_rope_parameters(tiny_model_dir) -> None:
    config = load_model(str(tiny_model_dir("llama")), load_format="dummy").config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    assert load_model(str(tiny_model_dir("qwen3")), load_format="dummy").config.rope_scaling is None


def test_legacy_rope_scaling_layout() -> None:
    hf = {**PRESETS["llama-3.1-8b"]}
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    old = {**hf, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_config(old).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = {**hf, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    config = ModelConfig.from_hf_config(plain)
    assert (config.rope_theta, config.rope_scaling) == (1234.0, None)


def test_sharded_directory_equals_single_file(tiny_model_dir) -> None:
    sharded = tiny_model_dir("llama", sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(loader.safetensors_files(sharded)) > 1
    single = dict(load_model(str(tiny_model_dir("llama"))).weights or ())
    split = dict(load_model(str(sharded)).weights or ())
    assert set(single) == set(split)
    for name in single:
        assert torch.equal(single[name], split[name]), name


def test_bare_decoder_names_and_saved_tied_head(tiny_model_dir, tmp_path: Path) -> None:
    """A checkpoint without the ``model.`` prefix, saving a copy of the tied head: HF names, no lm_head."""
    from safetensors.torch import save_file

    source = tiny_model_dir("qwen2")  # tied embeddings
    expected = dict(load_model(str(source)).weights or ())
    renamed = {name.removeprefix("model."): t for name, t in expected.items()}
    renamed["lm_head.weight"] = expected["model.embed_tokens.weight"].clone()
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    ours = dict(load_model(str(tmp_path)).weights or ())
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_dtype_casts_every_weight(tiny_model_dir) -> None:
    weights = load_model(str(tiny_model_dir("qwen2")), dtype=torch.bfloat16).weights
    assert weights is not None
    dtypes = {tensor.dtype for _, tensor in weights}
    assert dtypes == {torch.bfloat16}


def test_bf16_checkpoint_keeps_its_dtype(tiny_model_dir) -> None:
    loaded = load_model(str(tiny_model_dir("mistral", dtype="bfloat16")))
    assert loaded.config.torch_dtype == "bfloat16"
    assert {t.dtype for _, t in loaded.weights or ()} == {torch.bfloat16}


# -------------------------------------------------------------------------------------------- bundled SmolLM2


def test_builtin_smollm2(smollm2_gguf_path: Path, smollm2_state_dict: dict[str, torch.Tensor]) -> None:
    assert loader.builtin_model_path("smollm2-135m-instruct") == smollm2_gguf_path
    loaded = load_model("builtin:smollm2-135m-instruct", load_format="dummy")
    assert loaded.name == "smollm2-135m-instruct"
    assert loaded.weights is None
    config = loaded.config
    assert (config.model_type, config.vocab_size, config.hidden_size) == ("llama", 49152, 576)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.intermediate_size, config.head_dim, config.max_position_embeddings) == (1536, 64, 8192)
    assert config.rope_theta == 100000.0
    assert config.rms_norm_eps == 1e-5  # stored as float32 in GGUF; read back as the checkpoint's value
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    # the dict form used by the engine: HF names and shapes
    shapes = {name: tuple(t.shape) for name, t in smollm2_state_dict.items()}
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.3.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.norm.weight"] == (576,)
    assert "lm_head.weight" not in shapes
    assert len(shapes) == 2 + 30 * 9


def test_smollm2_weights_match_transformers_gguf_conversion(
    smollm2_gguf_file: kgguf.GGUFFile, smollm2_state_dict: dict[str, torch.Tensor]
) -> None:
    """Oracles: the gguf package's own HF<->GGUF name map and dequantizer, and transformers' un-permutation of
    llama.cpp's Q/K rows (what `from_pretrained(gguf_file=...)` does)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = smollm2_gguf_file.reader
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    seen = set()
    for hf_name in smollm2_state_dict:
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        seen.add(gguf_name)
    assert seen == {t.name for t in reader.tensors}
    # the weights: check every layer's Q and K (permuted), one layer fully, the embeddings and the final norm
    by_name = {t.name: t for t in reader.tensors}
    checked = ["token_embd.weight", "output_norm.weight"]
    checked += [f"blk.{i}.attn_{p}.weight" for i in range(30) for p in ("q", "k")]
    checked += [t for t in by_name if t.startswith("blk.7.")]
    for gguf_name in checked:
        t = by_name[gguf_name]
        expected = quants.dequantize(t.data, t.tensor_type)
        expected = processor.process(expected, gguf_name).weights
        hf_name = kgguf.hf_tensor_name(gguf_name)
        assert hf_name is not None
        assert torch.equal(smollm2_state_dict[hf_name], torch.from_numpy(np.array(expected))), gguf_name


def test_smollm2_unpermuted_q_pairs_rotary_halves(smollm2_state_dict: dict[str, torch.Tensor]) -> None:
    """Loading Q without undoing the permutation would still give a [576, 576] tensor; the HF layout is pinned
    by the oracle test above, this checks the operation itself is an involution-free inverse."""
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2 * 8, 3)  # 2 heads, head_dim 8
    permuted = w.reshape(2, 2, 4, 3).transpose(1, 2).reshape(16, 3)  # llama.cpp's converter
    assert not torch.equal(permuted, w)
    assert torch.equal(kgguf.unpermute_qk(permuted, 2), w)
    bias = torch.arange(16.0)
    assert torch.equal(kgguf.unpermute_qk(bias.reshape(2, 2, 4).transpose(1, 2).reshape(16), 2), bias)


def test_llama3_rope_factors_recovered_or_refused() -> None:
    divisors = kgguf.llama3_rope_frequency_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # the three regimes of Llama 3.1 8B
    assert kgguf.llama3_rope_scaling_from_factors(divisors, 500000.0, 128, "x") == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(kgguf.GGUFError, match=r"rope_freqs\.weight: frequency factors do not match"):
        kgguf.llama3_rope_scaling_from_factors(torch.linspace(1, 3, 64), 500000.0, 128, "f.gguf: rope_freqs.weight")


# --------------------------------------------------------------------------------------------- dequantizing


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_on_random_blocks(type_name: str) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    # realistic blocks: quantized from random floats
    values = rng.standard_normal((7, 4 * block_elems)).astype(np.float32) * rng.uniform(0.01, 10)
    packed = quants.quantize(values, qtype)
    ours = kgguf.dequantize_tensor(packed, type_name, values.shape)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), quants.dequantize(packed, qtype))
    # arbitrary bytes, with finite scales (random f16 bit patterns may be NaN/inf, where both give NaN anyway)
    raw = rng.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)
    num_scales = 2 if type_name == "Q4_1" else 1
    raw[:, : 2 * num_scales] = (
        rng.uniform(-2, 2, size=(64, num_scales)).astype(np.float16).view(np.uint8).reshape(64, 2 * num_scales)
    )
    ours = kgguf.dequantize_tensor(raw.reshape(-1), type_name, (64 * block_elems,))
    np.testing.assert_array_equal(ours.numpy(), quants.dequantize(raw, qtype).reshape(-1))


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_dequantize_float_types(type_name: str) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    values = np.random.default_rng(seed).standard_normal((5, 64)).astype(np.float32)
    raw = quants.quantize(values, gguf.GGMLQuantizationType[type_name]) if type_name == "BF16" else values
    if type_name == "F16":
        raw = values.astype(np.float16)
    tensor = kgguf.dequantize_tensor(raw, type_name, (5, 64))
    expected_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
    assert tensor.dtype == expected_dtype
    expected = torch.from_numpy(values).to(expected_dtype)
    assert torch.equal(tensor, expected)


# ------------------------------------------------------------------------------- GGUF files written here


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows of llama models."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TYPE_CYCLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def _write_gguf(directory: Path, out: Path, arch: str, source: kgguf.GGUFFile, num_tokens: int) -> dict[str, str]:
    """Convert a tiny HF directory to GGUF the way llama.cpp does, cycling the 2-D weights through every
    tensor type we dequantize, with the first ``num_tokens`` of SmolLM2's vocabulary (merges only when all).
    Returns hf_name -> type name."""
    hf = json.loads((directory / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in (load_model(str(directory)).weights or ())}
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]
    name_map = gguf.get_tensor_name_map(gguf_arch, hf["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(hf["vocab_size"])
    tokens = source.get("tokenizer.ggml.tokens")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(source.get("tokenizer.ggml.pre"))
    writer.add_token_list(tokens[:num_tokens])
    writer.add_token_types(source.get("tokenizer.ggml.token_type")[:num_tokens])
    writer.add_token_merges(source.get("tokenizer.ggml.merges") if num_tokens >= len(tokens) else [])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(source.get("tokenizer.chat_template"))
    rope = hf["rope_parameters"]
    if rope.get("rope_type") == "llama3":  # llama.cpp stores Llama 3 rope scaling as per-pair divisors
        head_dim = hf["head_dim"]
        inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        factors = []
        for freq in inv_freq:
            wavelen = 2 * np.pi / freq
            if wavelen < rope["original_max_position_embeddings"] / rope["high_freq_factor"]:
                factors.append(1.0)
            elif wavelen > rope["original_max_position_embeddings"] / rope["low_freq_factor"]:
                factors.append(rope["factor"])
            else:
                smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                    rope["high_freq_factor"] - rope["low_freq_factor"]
                )
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        assert len(set(factors)) > 2  # the premise: the three regimes all occur
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    types: dict[str, str] = {}
    num_matrices = 0
    for hf_name, value in sorted(state.items()):
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        if arch == "llama" and ".q_proj." in hf_name:
            value = _llama_cpp_permute(value, hf["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            value = _llama_cpp_permute(value, hf["num_key_value_heads"])
        type_name = "F32"
        if value.ndim == 2:
            type_name = _TYPE_CYCLE[num_matrices % len(_TYPE_CYCLE)]
            num_matrices += 1
        qtype = gguf.GGMLQuantizationType[type_name]
        data = value.astype(np.float16) if type_name == "F16" else value
        if type_name not in ("F32", "F16"):
            data = quants.quantize(value, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[hf_name] = type_name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_written_from_hf_round_trips(
    tiny_model_dir, tmp_path: Path, smollm2_gguf_file: kgguf.GGUFFile, arch: str
) -> None:
    directory = tiny_model_dir(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    # a short vocabulary: parsing all 49152 strings takes seconds, and the real file's tokenizer is tested apart
    num_tokens = 300
    types = _write_gguf(directory, path, arch, smollm2_gguf_file, num_tokens)
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"} <= set(types.values())
    expected = dict(load_model(str(directory)).weights or ())
    loaded = load_model(str(path))
    # a Q8_0 embedding / head comes as its codes (an int8 head keeps them); dequantized here
    ours = {name: w.dense() if isinstance(w, CodeGroups) else w for name, w in (loaded.weights or ())}
    assert set(ours) == set(expected)
    tolerances = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q4_0": 0.2, "Q4_1": 0.2}
    for name, tensor in ours.items():
        reference = expected[name]
        assert tensor.shape == reference.shape, name
        scale = reference.abs().max().item()
        error = (tensor.float() - reference).abs().max().item()
        assert error <= tolerances[types[name]] * scale, (name, types[name], error, scale)
    config, reference_config = loaded.config, load_model(str(directory), load_format="dummy").config
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm",
                  "max_position_embeddings", "vocab_size"):  # fmt: skip
        assert getattr(config, field) == getattr(reference_config, field), field
    assert config.rope_theta == reference_config.rope_theta
    assert config.rope_scaling == reference_config.rope_scaling
    assert config.rms_norm_eps == pytest.approx(reference_config.rms_norm_eps)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.vocab_size == num_tokens
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello world")) == "Hello world"
    assert loaded.name == f"tiny-{arch}"


# ---------------------------------------------------------------------------------------------------- dummy


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dummy_presets(preset: str) -> None:
    loaded = load_model(preset, load_format="dummy")
    assert loaded.weights is None and loaded.tokenizer is None
    assert loaded.name == preset
    assert loaded.config.num_attention_heads % loaded.config.num_key_value_heads == 0


def test_dummy_llama_3_1_8b_shapes() -> None:
    config = load_model("llama-3.1-8b", load_format="dummy").config
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (4096, 32, 128)
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    assert set(config.eos_token_ids) == {128001, 128008, 128009}


def test_dummy_from_config_json_and_directory(tiny_model_dir) -> None:
    directory = tiny_model_dir("qwen3")
    from_file = load_model(str(directory / "config.json"), load_format="dummy")
    from_dir = load_model(str(directory), load_format="dummy")
    assert from_file.config == from_dir.config
    assert from_file.weights is None and from_dir.weights is None
    assert from_dir.tokenizer is not None and from_file.tokenizer is not None


# --------------------------------------------------------------------------------------------------- errors


def test_bad_load_format() -> None:
    with pytest.raises(ValueError, match="load_format"):
        load_model("builtin:smollm2-135m-instruct", load_format="pickle")


def test_missing_source_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="unknown builtin model 'nope'"):
        load_model("builtin:nope")


def test_builtin_package_absent_says_make_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loader.BUILTIN_MODELS, "ghost", ("kubellm_package_that_is_not_installed", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="make setup"):
        load_model("builtin:ghost")


def test_directory_errors(tmp_path: Path, tiny_model_dir) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path))
    hf: dict[str, Any] = json.loads((tiny_model_dir("llama") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(FileNotFoundError, match="dummy"):
        load_model(str(tmp_path))  # no weights
    del hf["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="'hidden_size' is missing"):
        load_model(str(tmp_path), load_format="dummy")
    (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_size": 64, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model(str(tmp_path), load_format="dummy")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        load_model(str(tmp_path), load_format="dummy")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(str(path))


def test_format_mismatch(tiny_model_dir, smollm2_gguf_path: Path) -> None:
    with pytest.raises(ValueError, match="load_format='gguf'"):
        load_model(str(tiny_model_dir("llama")), load_format="gguf")
    with pytest.raises(ValueError, match="load_format='safetensors'"):
        load_model(str(smollm2_gguf_path), load_format="safetensors")


# ------------------------------------------------------------------------------------------------- progress


class _Terminal:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


class _Pipe(_Terminal):
    def isatty(self) -> bool:
        return False


def test_progress_is_quiet_off_a_terminal_except_the_summary() -> None:
    pipe = _Pipe()
    with Progress("loading x", total=3, unit="tensors", stream=pipe, enabled=True) as progress:
        progress.start -= 5  # as if it had run for 5 s
        for _ in range(3):
            progress.update()
    assert pipe.text.startswith("loading x: 3 tensors in ") and pipe.text.count("\n") == 1


def test_progress_draws_on_a_terminal_after_a_second() -> None:
    terminal = _Terminal()
    progress = Progress("loading x", total=4, unit="tensors", stream=terminal, enabled=True)
    progress.update()
    assert terminal.text == ""  # under a second: nothing drawn
    progress.start -= 2
    progress.update()
    assert "[" + "#" * 15 + "." * 15 + "]  2/4 tensors" in terminal.text
    progress.close()
    assert terminal.text.endswith("s\n") and "loading x: 2 tensors in" in terminal.text


def test_progress_disabled_and_failed_are_silent() -> None:
    pipe = _Pipe()
    with Progress("x", stream=pipe, enabled=False) as progress:
        progress.update()
    with pytest.raises(RuntimeError), Progress("y", stream=pipe, enabled=True):
        raise RuntimeError("boom")
    assert pipe.text == ""


@pytest.mark.slow
def test_smollm2_hf_dir_fixture_loads_everywhere(
    smollm2_hf_dir: Path, smollm2_state_dict: dict[str, torch.Tensor], smollm2_tokenizer
) -> None:
    """The Hugging Face copy of SmolLM2 other tests use as a transformers reference: same weights through our
    loader and through transformers, same tokenizer and chat template through transformers."""
    import transformers

    ours = dict(load_model(str(smollm2_hf_dir)).weights or ())
    theirs = _transformers_state_dict(smollm2_hf_dir)
    assert set(ours) == set(smollm2_state_dict) == set(theirs) - {"lm_head.weight"}
    for name, tensor in smollm2_state_dict.items():
        assert torch.equal(ours[name], tensor) and torch.equal(theirs[name], tensor), name
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    messages = [{"role": "user", "content": "Hi 😀"}]
    text = smollm2_tokenizer.apply_chat_template(messages)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert hf_tokenizer.encode(text) == smollm2_tokenizer.encode(text)


def test_smollm2_fixture(smollm2, smollm2_state_dict: dict[str, torch.Tensor]) -> None:
    """The function-scoped `smollm2` fixture hands each test its own iterator over the shared weights."""
    assert smollm2.name == "smollm2-135m-instruct" and smollm2.tokenizer is not None
    names = [name for name, _ in smollm2.weights]
    assert names == list(smollm2_state_dict) and len(names) == 272
    assert next(smollm2.weights, None) is None  # one-shot, like load_model's


def _metadata_only_gguf(path: Path, arch: str, *, block_count: bool = True, tokenizer_model: str = "gpt2") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    if block_count:
        writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_context_length(256)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_errors_name_the_key(tmp_path: Path) -> None:
    config = load_model(str(_metadata_only_gguf(tmp_path / "ok.gguf", "llama")), load_format="dummy").config
    assert (config.num_hidden_layers, config.vocab_size, config.head_dim) == (2, 3, 16)
    with pytest.raises(kgguf.GGUFError, match=r"general\.architecture 'gemma' is not supported"):
        load_model(str(_metadata_only_gguf(tmp_path / "a.gguf", "gemma")), load_format="dummy")
    with pytest.raises(kgguf.GGUFError, match=r"'llama\.block_count' is missing"):
        load_model(str(_metadata_only_gguf(tmp_path / "b.gguf", "llama", block_count=False)), load_format="dummy")
    with pytest.raises(kgguf.GGUFError, match=r"tokenizer\.ggml\.model 'bert' is not supported"):
        load_model(str(_metadata_only_gguf(tmp_path / "c.gguf", "llama", tokenizer_model="bert")))
