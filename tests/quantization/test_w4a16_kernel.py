"""The Triton W4A16 GEMM (kernels/quant_gemm.py) against its torch reference (kernels/quant_reference.py) over odd
shapes, group sizes, act-order g_idx and dtypes: under TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from kubellm.runtime.kernels import quant_gemm, quant_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative error ||out - ref|| / ||ref||: float32 dots in ieee; bf16 / fp16 operands round the dequantized weight
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def random_w4(k: int, n: int, group_size: int, gen: torch.Generator, act_order: bool):
    num_groups = -(-k // group_size)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    qweight = quant_reference.pack_int4_rows(codes)
    scales = torch.rand(num_groups, n, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 17, (num_groups, n), generator=gen).to(torch.uint8)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=gen) // group_size).to(torch.int32)
    return qweight, scales, zeros, g_idx


@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "act_order"),
    [
        (1, 64, 48, 32, False),
        (5, 136, 72, 8, False),  # K not a multiple of the tile, N not of 64
        (17, 96, 40, 32, True),
        (33, 256, 130, 128, False),
        (70, 48, 24, 16, True),
        (3, 40, 8, 40, False),  # one group over all of K (GPTQ group_size -1)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w4a16_matches_the_reference(
    m: int, k: int, n: int, group_size: int, act_order: bool, dtype: torch.dtype
) -> None:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    qweight, scales, zeros, g_idx = random_w4(k, n, group_size, gen, act_order)
    x = torch.randn(m, k, generator=gen).to(dtype)
    scales = scales.to(dtype)
    ref = quant_reference.w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)
    to = {"device": DEVICE}
    out = quant_gemm.w4a16_matmul(
        x.to(**to), qweight.to(**to), scales.to(**to), zeros.to(**to), group_size,
        None if g_idx is None else g_idx.to(**to),
    )  # fmt: skip
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_error(out, ref) < TOLERANCE[dtype]


def test_reference_packing_round_trips() -> None:
    codes = torch.randint(0, 16, (24, 5))
    assert torch.equal(quant_reference.unpack_int4_rows(quant_reference.pack_int4_rows(codes)).long(), codes)
    with pytest.raises(ValueError, match="multiple of 8"):
        quant_reference.pack_int4_rows(torch.zeros(12, 3, dtype=torch.long))


def test_bad_shapes_are_refused() -> None:
    qweight = torch.zeros(8, 16, dtype=torch.int32)
    scales, zeros = torch.ones(2, 16), torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="qweight must be"):
        quant_gemm.w4a16_matmul(torch.zeros(2, 60), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="zeros"):
        quant_gemm.w4a16_matmul(torch.zeros(2, 64), qweight, scales, zeros.int(), 32)
