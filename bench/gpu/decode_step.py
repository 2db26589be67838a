"""Benchmark 2: a batch-1 decode step of Llama-3.1-8B shapes (dummy bf16 weights) against its roofline.

One sequence decoding must read every weight once per token, plus its KV cache:

    floor per step = (weight bytes + context * num_layers * 2 * num_kv_heads * head_dim * 2 bytes) / copy bandwidth

with the device-to-device copy bandwidth (bytes read + written) measured in the same run. The step time is the
median gap between consecutive tokens of one request through the engine's public interface
(`LLM.generate(..., on_delta=...)`): it includes the engine's scheduling and sampling, as a user sees it.
The same loaded engine is timed twice: with its decode CUDA graphs (the default on a GPU) and without them
(as `--enforce-eager` runs).

    python bench/gpu/decode_step.py [--model llama-3.1-8b] [--prompt-len 512] [--output-len 256]
    python bench/gpu/decode_step.py --smoke
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import gpubench


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a loader preset (dummy weights)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()
    if args.smoke:
        args.prompt_len, args.output_len = 9, 6
    device = gpubench.setup(args)

    import torch

    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    copy_gbs = gpubench.copy_bandwidth_gbs(device, nbytes=(1 << 30) if not args.smoke else (1 << 20))
    with tempfile.TemporaryDirectory() as workdir:
        source, _hf_config = gpubench.model_source(args.model, args.smoke, Path(workdir))
        started = time.perf_counter()
        llm = LLM(
            model=source, load_format="dummy", max_model_len=args.prompt_len + args.output_len + 64,
            max_num_seqs=1, enable_prefix_caching=False, **gpubench.engine_options(args),
        )  # fmt: skip
        load_s = time.perf_counter() - started
    engine: Any = llm.engine
    cfg = engine.model_config
    backend = engine.model.layers[0].self_attn.backend.name
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)

    def measure() -> tuple[float, list[float], float]:
        """(TTFT ms, inter-token gaps ms, total s) of one request."""
        llm.generate([prompt[: max(args.prompt_len // 2, 1)]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm
        stamps: list[float] = []

        def on_delta(_delta: Any) -> None:
            gpubench.sync(device)
            stamps.append(time.perf_counter())

        start = time.perf_counter()
        outputs = llm.generate([prompt], params, on_delta=on_delta)
        total = time.perf_counter() - start
        generated = len(outputs[0].outputs[0].token_ids)
        if generated != args.output_len:
            raise SystemExit(f"expected {args.output_len} tokens, got {generated}")
        return (stamps[0] - start) * 1e3, [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)], total

    graphs = engine.runner.graphs
    ttft_ms, gaps_ms, total_s = measure()
    step_ms = statistics.median(gaps_ms)
    engine.runner.graphs = None  # the same engine, eager
    _, eager_gaps_ms, _ = measure()
    eager_step_ms = statistics.median(eager_gaps_ms)
    engine.runner.graphs = graphs

    weights = gpubench.weight_bytes(engine.model)
    elt = torch.empty((), dtype=engine.dtype).element_size()
    mean_context = args.prompt_len + args.output_len / 2
    kv_bytes = int(mean_context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elt)
    floor_ms = (weights + kv_bytes) / (copy_gbs * 1e9) * 1e3
    results = {
        "copy_bandwidth_gbs": copy_gbs,
        "weight_bytes": weights,
        "kv_bytes_per_step_mean": kv_bytes,
        "roofline_step_ms": floor_ms,
        "step_ms_median": step_ms,
        "step_ms_p90": statistics.quantiles(gaps_ms, n=10)[-1] if len(gaps_ms) >= 2 else step_ms,
        "tokens_per_s": 1e3 / step_ms,
        "fraction_of_roofline": floor_ms / step_ms,
        "ttft_ms": ttft_ms,
        "total_s": total_s,
        "model_load_s": load_s,
        "attention_backend": backend,
        "cuda_graphs": graphs is not None,
        "step_ms_median_eager": eager_step_ms,
        "graph_speedup": eager_step_ms / step_ms,
    }
    workload = {
        "model": args.model, "weights": "dummy", "dtype": str(engine.dtype).removeprefix("torch."),
        "batch": 1, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
    }  # fmt: skip
    path = gpubench.write_result("decode_step", args, device, workload, results)
    print(f"wrote {path}")
    gpubench.print_table(
        ["model", "backend", "graphs", "step ms", "eager ms", "roofline ms", "of roofline", "tok/s", "TTFT ms"],
        [
            [
                args.model,
                backend,
                graphs is not None,
                step_ms,
                eager_step_ms,
                floor_ms,
                f"{100 * floor_ms / step_ms:.1f}%",
                1e3 / step_ms,
                ttft_ms,
            ]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
