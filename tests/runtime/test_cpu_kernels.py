"""The C++ CPU kernels (runtime/kernels/cpu_ops.cpp) against the reference ops, and the torch fallback that
serves where they cannot be built. The kernels must build here: this machine has the toolchain, so a failed build
fails the suite instead of quietly testing only the fallback."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from kubellm.runtime.kernels import cpu, quant_reference, reference
from kubellm.runtime.kernels.cpu_backend import CpuAttentionBackend
from kubellm.runtime.kernels.dispatch import get_attention_backend
from kubellm.runtime.kernels.interface import AttentionMetadata

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture(scope="module")
def kernels():
    module = cpu.load()
    assert module is not None, "the CPU kernels did not build (see the warning logged by kubellm.runtime.kernels.cpu)"
    return module


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(kernels, gen: torch.Generator, dtype: torch.dtype) -> None:
    for rows, hidden in ((1, 576), (7, 96), (65, 64)):
        x = torch.randn((rows, hidden), generator=gen).to(dtype)
        residual = torch.randn((rows, hidden), generator=gen).to(dtype)
        weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
        for res in (None, residual):
            out, new_residual = kernels.rms_norm(x, res, weight, 1e-5)
            ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, res)
            assert torch.equal(new_residual, ref_residual)  # x + residual, rounded once
            torch.testing.assert_close(out.float(), ref_out.float(), rtol=ULP[dtype], atol=ULP[dtype])
        # a strided row view (every other row) reads the right rows
        out, _ = kernels.rms_norm(x[::2], None, weight, 1e-5)
        torch.testing.assert_close(out.float(), reference.rms_norm(x[::2], weight, 1e-5)[0].float(),
                                   rtol=ULP[dtype], atol=ULP[dtype])  # fmt: skip
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        kernels.rms_norm(x, residual[:1], weight, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(kernels, gen: torch.Generator, dtype: torch.dtype) -> None:
    cache = reference.rope_cos_sin_cache(32, 300)
    positions = torch.tensor([0, 7, 299, 64, 1])
    qkv = torch.randn((5, (4 + 2 * 2) * 32), generator=gen).to(dtype)
    qk = qkv[:, : 6 * 32].view(5, 6, 32)  # a strided view, as the attention layer passes it
    out = kernels.rotary(qk, positions, cache)
    ref_q, ref_k = reference.rotary_embedding(positions, qk[:, :4].clone(), qk[:, 4:].clone(), cache)
    torch.testing.assert_close(out.float(), torch.cat([ref_q, ref_k], 1).float(), rtol=ULP[dtype], atol=ULP[dtype])
    with pytest.raises(RuntimeError, match="position out of range"):
        kernels.rotary(qk, torch.tensor([0, 1, 2, 3, 300]), cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("head_dim", [32, 24])  # 24: not whole 16-lane vectors, the portable loops
def test_paged_decode_attention(
    kernels, gen: torch.Generator, dtype: torch.dtype, num_heads: int, num_kv_heads: int, block_size: int,
    head_dim: int,
) -> None:  # fmt: skip
    num_blocks = 96
    seq_lens = [1, 17, 40, 0, 5]  # 0: an empty sequence gives zeros
    cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = []
    for n in seq_lens:
        used, perm = perm[: -(-n // block_size)], perm[-(-n // block_size) :]
        tables.append(used + [0] * (width - len(used)))
    block_tables = torch.tensor(tables, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn((len(seq_lens), num_heads, head_dim), generator=gen).to(dtype)
    out = kernels.paged_decode_attention(query, cache, block_tables, lens, 0.2)
    live = lens > 0
    num_live = int(live.sum())
    ref = reference.paged_attention(
        query[live].double(), cache.double(), block_tables[live], lens[live],
        torch.arange(num_live + 1, dtype=torch.int32), 0.2,
    )  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[live].double(), ref, rtol=tol, atol=tol)
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))
    bad = block_tables.clone()
    bad[2, 0] = num_blocks
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernels.paged_decode_attention(query, cache, bad, lens, 0.2)


def test_int8_matmul(kernels, gen: torch.Generator) -> None:
    codes = torch.randint(-127, 128, (300, 96), generator=gen, dtype=torch.int8)
    scales = torch.rand(300, 3, generator=gen) * 0.01
    weight = (codes.float().reshape(300, 3, 32) * scales[..., None]).reshape(300, 96)
    for rows in (1, 3):
        x = torch.randn(rows, 96, generator=gen)
        torch.testing.assert_close(kernels.int8_matmul(x, codes, scales), x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.int8_matmul(x, codes, scales[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="float32"):
        kernels.int8_matmul(x.bfloat16(), codes, scales)


ISA_NAMES = {1: "scalar", 2: "avx2", 3: "avx512"}


@pytest.mark.parametrize("isa", sorted(ISA_NAMES))
@pytest.mark.parametrize(("group_size", "offsets"), [(16, False), (32, True), (32, False)])
def test_int8_group_matmul(kernels, gen: torch.Generator, isa: int, group_size: int, offsets: bool) -> None:
    """The int8 group matmul (GGUF Q6_K / Q5_K / Q8_0 layouts) against its torch reference, on each ISA path this
    CPU has (forced: an AVX-512 machine runs the AVX2 path too), at decode and prefill row counts; below 16 rows the
    register path, from 16 on the dequantized tiles and GEMMs (also forced to the register path there)."""
    if isa > kernels.int8_group_matmul_isa():
        pytest.skip(f"this CPU has no {ISA_NAMES[isa]}")
    k = group_size * int(torch.randint(1, 9, (), generator=gen)) * 2  # K: a multiple of the group (and of 32)
    n = int(torch.randint(1, 150, (), generator=gen))  # odd N: a partial tile of 64 rows
    low = 0 if offsets else -32  # Q5_K's codes 0..31, Q6_K's -32..31
    codes = torch.randint(low, 32, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group_size, generator=gen) * 0.02
    off = torch.randn(n, k // group_size, generator=gen) * 0.05 if offsets else None
    print(f"n={n} k={k}")
    for rows in (1, 3, 5, 17, 64, 300):
        x = torch.randn(rows, k, generator=gen)
        ref = quant_reference.int8_group_matmul(x, codes, scales, off, group_size)
        for gemm_min_rows in (16, 1 << 30):
            print(f"rows={rows} gemm_min_rows={gemm_min_rows}")
            out = kernels.int8_group_matmul(x, codes, scales, off, group_size, isa, gemm_min_rows)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-4)


def test_int8_group_matmul_refuses_bad_input(kernels) -> None:
    x, codes, scales = torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 4)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.int8_group_matmul(x, codes, scales[:, :2].contiguous(), None, 16)
    with pytest.raises(RuntimeError, match="offsets must be"):
        kernels.int8_group_matmul(x, codes, scales, torch.ones(8, 2), 16)
    with pytest.raises(RuntimeError, match="group_size must be"):
        kernels.int8_group_matmul(x, codes, scales, None, 8)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.int8_group_matmul(x.bfloat16(), codes, scales, None, 16)
    with pytest.raises(RuntimeError, match="isa must be"):
        kernels.int8_group_matmul(x, codes, scales, None, 16, 7)


def spy_on(kernels, name: str, calls: list):
    """The kernels with `name` recording each call's arguments in `calls`."""
    real = getattr(kernels, name)

    class Spy:
        def __getattr__(self, attr: str):
            if attr == name:
                return lambda *args: (calls.append(args), real(*args))[1]
            return getattr(kernels, attr)

    return Spy()


def test_the_cpu_backend_decodes_through_the_kernel(kernels, gen: torch.Generator) -> None:
    """Decodes through CpuAttentionBackend go to the kernel and equal the reference."""
    calls: list = []
    backend = CpuAttentionBackend(spy_on(kernels, "paged_decode_attention", calls))
    for num_seqs in (2, 9):
        block_size, num_blocks = 4, 64
        seq_lens = [3 + 5 * i for i in range(num_seqs)]
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        tables, slots = [], []
        for n in seq_lens:
            table, perm = perm[: -(-n // block_size)], perm[-(-n // block_size) :]
            tables.append(table)
            slots.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
        width = max(len(t) for t in tables)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
            max_query_len=1,
            max_seq_len=max(seq_lens),
            num_decode_tokens=num_seqs,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=list(range(num_seqs + 1)),
        )
        cache = torch.randn((2, num_blocks, block_size, 2, 16), generator=gen)
        query = torch.randn((num_seqs, 4, 16), generator=gen)
        key, value = torch.randn((2, num_seqs, 2, 16), generator=gen)
        out = backend.forward(query, key, value, cache, backend.build_metadata(md), 0.25)
        ref = reference.paged_attention(query, cache, md.block_tables, md.seq_lens, md.query_start_loc, 0.25)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [args[0].shape[0] for args in calls] == [2, 9]


def test_ops_fall_back_to_torch_without_the_kernels() -> None:
    """KUBELLM_CPU_KERNELS=0: no build, the torch backend is chosen, and its ops still match the reference."""
    code = (
        "import torch\n"
        "from kubellm.runtime.kernels import cpu, reference\n"
        "from kubellm.runtime.kernels.dispatch import get_attention_backend\n"
        "assert cpu.load() is None\n"
        "ops = get_attention_backend(torch.device('cpu'))\n"
        "assert ops.name == 'torch', ops.name\n"
        "x = torch.randn(3, 8).bfloat16(); w = torch.randn(8).bfloat16()\n"
        "assert torch.equal(ops.rms_norm(x, w, 1e-6, x)[0], reference.rms_norm(x, w, 1e-6, x)[0])\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1", "KUBELLM_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_ops_take_the_kernel_path(kernels) -> None:
    calls: list = []
    backend = CpuAttentionBackend(spy_on(kernels, "rms_norm", calls))
    x = torch.randn(2, 8)
    backend.rms_norm(x, torch.ones(8), 1e-6)
    assert len(calls) == 1


def test_the_dispatch_picks_the_cpu_backend(kernels) -> None:
    assert get_attention_backend(torch.device("cpu")).name == "cpu"
