"""Compile every Triton kernel ahead of time for NVIDIA GPUs, with no GPU: catches what the interpreter forgives.

The interpreter runs kernels as numpy code, so type errors, unsupported constructs and layout problems of the
compiled path only show on a GPU. Triton can compile for a named target without one (its wheel bundles ptxas);
this script does so for the shapes the runtime uses and prints, per kernel, a JSON line with the registers, the
local memory (spills) and which load / matrix instructions the PTX holds.

    TRITON_INTERPRET unset:  python tests/kernels/aot_compile.py [--arch 90]

Run by tests/kernels/test_aot_compile.py in a subprocess (the kernel modules must be imported without the
interpreter, which the kernel tests' conftest turns on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

FLOAT_ARGS = {"scale_log2", "eps"}


def _signature(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers[name]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _cases() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]]:
    """(label, kernel, pointer element types, constexprs, num_warps, num_stages) for the shapes that matter."""
    from kubellm.runtime.kernels import fused, kv_cache, paged_attention, prefill_attention

    cases: list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]] = []

    def attention_pointers(dt: str, cache: str | None = None) -> dict[str, str]:
        return {
            "q_ptr": dt, "cache_ptr": cache or dt, "kv_scale_ptr": "*fp32", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "out_ptr": dt, "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32",
        }  # fmt: skip

    # a quantized KV cache (kernels/kv_quant.py): QUANT 1 = int8 codes, 2 = float8 e4m3 codes
    quantized = ((1, "*i8"), (2, "*fp8e4nv"))

    # decode: Llama-3 (group 4, d 128), MHA (group 1), group 8 / d 64, SmolLM2 (group 3, d 64)
    for group, head_dim, dt, splits in (
        (4, 128, "*bf16", 2),
        (1, 128, "*fp16", 1),
        (8, 64, "*bf16", 4),
        (4, 128, "*fp32", 2),
        (3, 64, "*bf16", 8),
    ):
        constexprs = {
            "GROUP": group, "GROUP_PAD": max(1 << (group - 1).bit_length(), 16), "HEAD_DIM": head_dim,
            "HEAD_DIM_PAD": head_dim, "BLOCK_N": 64, "NUM_SPLITS": splits, "DOT_F32": False,
            "DOT_PRECISION": "ieee" if dt == "*fp32" else "tf32",
        }  # fmt: skip
        label = f"decode g{group} d{head_dim} {dt[1:]} splits{splits}"
        cases.append(
            (label, paged_attention._decode_attention_kernel, attention_pointers(dt), {**constexprs, "QUANT": 0}, 4, 2)
        )
        if dt == "*bf16":
            for quant, cache in quantized:
                cases.append(
                    (f"{label} cache {cache[1:]}", paged_attention._decode_attention_kernel,
                     attention_pointers(dt, cache), {**constexprs, "QUANT": quant}, 4, 2)
                )  # fmt: skip
    for head_dim, splits in ((128, 2), (64, 16)):
        constexprs = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": head_dim, "NUM_SPLITS": splits, "SPLITS_PAD": splits}
        cases.append(
            (f"merge d{head_dim} splits{splits}", paged_attention._merge_splits_kernel, attention_pointers("*bf16"),
             constexprs, 2, 1)
        )  # fmt: skip
    # prefill / extend
    for group, head_dim, dt in ((4, 128, "*bf16"), (3, 64, "*bf16"), (1, 128, "*fp32"), (8, 128, "*fp16")):
        tile = 32 if dt == "*fp32" else 64  # the launcher's default tiles (float32: exact dots on smaller tiles)
        constexprs = {
            "GROUP": group, "HEAD_DIM": head_dim, "HEAD_DIM_PAD": head_dim, "BLOCK_M": tile,
            "TOKENS_PER_TILE": tile // group, "BLOCK_N": tile, "DOT_F32": False,
            "DOT_PRECISION": "ieee" if dt == "*fp32" else "tf32",
        }  # fmt: skip
        for quant, cache in ((0, dt), *(quantized if dt == "*bf16" else ())):
            label = f"prefill g{group} d{head_dim} {dt[1:]} cache {cache[1:]}"
            cases.append(
                (label, prefill_attention._prefill_attention_kernel, attention_pointers(dt, cache),
                 {**constexprs, "QUANT": quant}, 8 if dt == "*fp32" else 4, 2)
            )  # fmt: skip
    for quant, cache in ((0, "*bf16"), *quantized):
        cases.append(
            (f"kv_cache write 8x128 bf16 to {cache[1:]}", kv_cache._write_kv_cache_kernel,
             {"key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": cache, "slot_mapping_ptr": "*i64",
              "kv_scale_ptr": "*fp32"},
             {"HEAD_DIM": 128, "ROW": 1024, "BLOCK": 1024, "QUANT": quant, "ROUND_E4M3": False}, 4, 1)
        )  # fmt: skip
    norm_pointers = {k: "*bf16" for k in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "new_residual_ptr")}
    for residual in (False, True):
        cases.append(
            (f"rms_norm 4096 bf16 residual={residual}", fused._rms_norm_kernel, norm_pointers,
             {"HAS_RESIDUAL": residual, "BLOCK": 4096}, 16, 1)
        )  # fmt: skip
    for neox in (True, False):
        cases.append(
            (f"rotary d128 32 heads neox={neox}", fused._rotary_kernel,
             {"positions_ptr": "*i64", "x_ptr": "*bf16", "cos_sin_ptr": "*fp32"},
             {"HALF": 64, "HALF_PAD": 64, "HEADS_PAD": 32, "IS_NEOX": neox}, 4, 1)
        )  # fmt: skip
    cases.append(
        ("silu_and_mul 1024 bf16", fused._silu_and_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"},
         {"BLOCK": 1024}, 4, 1)
    )  # fmt: skip
    return cases


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and local memory (spills) from cuobjdump, which Triton's NVIDIA backend bundles."""
    from triton.backends.nvidia import compiler as nvidia_compiler

    tool = Path(nvidia_compiler.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    usage = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        match = re.search(rf"\b{key}:(\d+)", out.stdout)
        usage[key.lower()] = int(match.group(1)) if match else -1
    return usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be defined for compilation")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, kernel, pointers, constexprs, num_warps, num_stages in _cases():
        signature = _signature(kernel, pointers, constexprs)
        # what the launcher specializes at run time for these shapes: aligned tensors, and integer arguments
        # (strides, hidden sizes, block_size, head counts) that are multiples of 16
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(kernel.arg_names)
            if signature[name] in ("i32",) or name.endswith("_ptr")
        }
        record: dict[str, Any] = {"kernel": label}
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
            ptx = compiled.asm["ptx"]
            record.update(_resource_usage(compiled.asm["cubin"]))
            record["ok"] = True
            record["mma"] = len(re.findall(r"\b(?:mma|wgmma)\.", ptx))
            record["vector_loads"] = len(re.findall(r"ld\.global[.a-z0-9]*\.v[24]|cp\.async", ptx))
        except Exception as error:  # report every kernel, then fail
            record.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
            failures += 1
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "gpu"))
    import gpubench

    gpubench.ensure_kubellm()
    sys.exit(main())
