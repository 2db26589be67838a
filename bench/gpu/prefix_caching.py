"""Benchmark 4: time to first token with a shared 2,000-token prefix, served from the prefix cache vs computed.

Requests are a 2,000-token prefix followed by a 32-token suffix of their own, one at a time (max_tokens 1), so
the time to first token is the prefill. Two series through one engine (prefix caching on):

- uncached: every request brings a fresh random prefix, so nothing can be reused;
- cached:   every request shares one prefix, sent once beforehand; only the suffix (and the partial last block
            of the prefix) is computed. `metrics.num_cached_tokens` confirms the hits.

TTFT = first_token_time - arrival_time from the request's metrics (monotonic clock); medians reported.

    python bench/gpu/prefix_caching.py [--model llama-3.1-8b] [--prefix-len 2000] [--num-requests 16]
    python bench/gpu/prefix_caching.py --smoke
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpubench


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a loader preset (dummy weights)")
    parser.add_argument("--prefix-len", type=int, default=2000)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=16)
    args = parser.parse_args()
    if args.smoke:
        args.prefix_len, args.suffix_len, args.num_requests = 40, 5, 3
    device = gpubench.setup(args)

    import torch

    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    with tempfile.TemporaryDirectory() as workdir:
        source, _ = gpubench.model_source(args.model, args.smoke, Path(workdir))
        llm = LLM(
            model=source, load_format="dummy", max_model_len=args.prefix_len + args.suffix_len + 16,
            enable_prefix_caching=True, max_num_batched_tokens=max(4096, args.prefix_len + args.suffix_len),
            **gpubench.engine_options(args),
        )  # fmt: skip
    engine: Any = llm.engine
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    params = SamplingParams(max_tokens=1, ignore_eos=True)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        (output,) = llm.generate([prompt], params)
        metrics = output.metrics
        assert metrics.first_token_time is not None
        return (metrics.first_token_time - metrics.arrival_time) * 1e3, metrics.num_cached_tokens

    for _ in range(2):  # warm up: kernel compilation, allocator
        ttft(tokens(args.prefix_len + args.suffix_len))
    uncached = [ttft(tokens(args.prefix_len + args.suffix_len)) for _ in range(args.num_requests)]
    shared = tokens(args.prefix_len)
    ttft(shared + tokens(args.suffix_len))  # fills the cache with the shared prefix
    cached = [ttft(shared + tokens(args.suffix_len)) for _ in range(args.num_requests)]

    block_size = engine.cache_config.block_size
    expected_hits = args.prefix_len // block_size * block_size
    hits = [n for _, n in cached]
    if min(hits) < expected_hits:
        raise SystemExit(f"prefix cache hits {hits}, expected at least {expected_hits} cached tokens each")
    if max(n for _, n in uncached) >= block_size:
        raise SystemExit("fresh random prefixes hit the cache: the uncached series is not uncached")
    uncached_ms = statistics.median(t for t, _ in uncached)
    cached_ms = statistics.median(t for t, _ in cached)
    results = {
        "ttft_ms_uncached_median": uncached_ms,
        "ttft_ms_cached_median": cached_ms,
        "speedup": uncached_ms / cached_ms,
        "ttft_ms_uncached": [t for t, _ in uncached],
        "ttft_ms_cached": [t for t, _ in cached],
        "cached_tokens_per_request": hits,
        "attention_backend": engine.model.layers[0].self_attn.backend.name,
    }
    workload = {
        "model": args.model, "weights": "dummy", "dtype": str(engine.dtype).removeprefix("torch."),
        "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "num_requests": args.num_requests,
        "block_size": block_size, "concurrency": 1, "max_tokens": 1,
    }  # fmt: skip
    path = gpubench.write_result("prefix_caching", args, device, workload, results)
    print(f"wrote {path}")
    gpubench.print_table(
        ["series", "TTFT ms (median)", "cached tokens"],
        [["uncached", uncached_ms, 0], ["cached", cached_ms, min(hits)], ["speedup", uncached_ms / cached_ms, ""]],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
