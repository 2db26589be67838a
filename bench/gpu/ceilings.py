"""The device's two ceilings, measured: device-to-device copy bandwidth and dense bf16 matmul rate.

Copy: 1 GiB (and 4 GiB) bf16 buffers, two sources alternating, bytes counted = read + written.
Matmul: 8192 x 8192 x 8192 bf16 (and 4096^3) on random data, 2 n^3 FLOPs.
Every other benchmark quotes its numbers against these (bandwidth-bound kernels against the copy, compute-bound
ones against the matmul).

    python bench/gpu/ceilings.py
    python bench/gpu/ceilings.py --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpubench


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = gpubench.setup(args)
    copy_sizes = [1 << 20] if args.smoke else [1 << 30, 4 << 30]
    matmul_sizes = [128] if args.smoke else [4096, 8192]
    rows: list[list[object]] = []
    results: dict[str, object] = {}
    for nbytes in copy_sizes:
        gbs = gpubench.copy_bandwidth_gbs(device, nbytes)
        results[f"copy_{nbytes >> 20}MiB_gbs"] = gbs
        rows.append([f"copy {nbytes >> 20} MiB (read + write)", f"{gbs:.1f} GB/s"])
    for n in matmul_sizes:
        tflops = gpubench.matmul_tflops(device, n)
        results[f"matmul_{n}_tflops"] = tflops
        rows.append([f"matmul {n}^3 {'bf16' if not args.smoke else 'fp32'}", f"{tflops:.1f} TFLOP/s"])
    workload = {"copy_bytes": copy_sizes, "matmul_n": matmul_sizes, "data": "random"}
    path = gpubench.write_result("ceilings", args, device, workload, results)
    print(f"wrote {path}")
    gpubench.print_table(["ceiling", "rate"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
