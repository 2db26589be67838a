"""Benchmark 3: offline throughput on the nano-vllm workload, kubellm vs Hugging Face transformers `generate`.

Workload (nano-vllm's bench.py): 256 requests, prompt and output lengths each uniform in [100, 1024] (fixed seed),
random prompt token ids, ignore_eos, Qwen3-0.6B shapes with dummy bf16 weights. Both sides count the requested
output tokens (sum of max_tokens) over the wall time of the whole run.

- kubellm: `LLM.generate` on all 256 requests at once (continuous batching, paged KV cache, Triton kernels).
- transformers: the same architecture and dtype (`AutoModelForCausalLM.from_config`, random init), static
  batches in request order, left-padded, each batch generating until its longest request is done
  (`min_new_tokens = max_new_tokens`: EOS ignored); batch size: the largest power of two (<= 256) whose KV cache
  and activations are estimated to fit, halved on out-of-memory.

    python bench/gpu/offline_throughput.py [--num-requests 256] [--skip-hf]
    python bench/gpu/offline_throughput.py --smoke
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpubench


def make_workload(
    num_requests: int, min_len: int, max_len: int, vocab: int, seed: int = 0
) -> list[tuple[list[int], int]]:
    """[(prompt_token_ids, max_tokens)], drawn like nano-vllm's bench (token ids below 10,000)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt = [rng.randint(0, min(10_000, vocab - 1)) for _ in range(rng.randint(min_len, max_len))]
        requests.append((prompt, rng.randint(min_len, max_len)))
    return requests


def run_kubellm(args: Any, source: str, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    max_len = max(len(p) + n for p, n in requests)
    llm = LLM(
        model=source, load_format="dummy", max_model_len=max_len + 16, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, **gpubench.engine_options(args),
    )  # fmt: skip
    engine: Any = llm.engine
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up (kernel compilation)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.6) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(n for _, n in requests)
    if generated != expected:
        raise SystemExit(f"kubellm generated {generated} tokens, expected {expected}")
    result = {
        "output_tokens": generated,
        "seconds": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + sum(len(p) for p, _ in requests)) / elapsed,
        "attention_backend": engine.model.layers[0].self_attn.backend.name,
        "num_kv_blocks": engine.cache_config.num_blocks,
    }
    del llm, engine
    return result


def _hf_batch_size(args: Any, hf_config: dict[str, Any], requests: list[tuple[list[int], int]], device: Any) -> int:
    """Largest power of two <= the request count whose estimated memory fits in 85% of free device memory."""
    import torch

    if device.type != "cuda":
        return min(4, len(requests))
    free, _ = torch.cuda.mem_get_info(device)
    longest = max(len(p) for p, _ in requests) + max(n for _, n in requests)
    kv_per_token = hf_config["num_hidden_layers"] * 2 * hf_config["num_key_value_heads"] * hf_config["head_dim"] * 2
    # prefill activations (hidden + gate/up of the MLP, bf16, a few live at once) and per-step fp32 logits
    act_per_token = 4 * (hf_config["hidden_size"] + 2 * hf_config["intermediate_size"]) * 2
    per_request = longest * kv_per_token + max(len(p) for p, _ in requests) * act_per_token
    per_request += hf_config["vocab_size"] * 4 * 2
    size = 1
    while size * 2 <= min(len(requests), 256) and (size * 2) * per_request < 0.85 * free:
        size *= 2
    return size


def run_hf(args: Any, hf_config: dict[str, Any], requests: list[tuple[list[int], int]], device: Any) -> dict[str, Any]:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "torch_dtype"})
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    pad_id = 0
    batch_size = _hf_batch_size(args, hf_config, requests, device)

    def run_batch(batch: list[tuple[list[int], int]]) -> int:
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        new_tokens = max(n for _, n in batch)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=True, temperature=0.6, top_p=1.0, top_k=0, pad_token_id=pad_id,
            )  # fmt: skip
        return int(out.shape[0] * (out.shape[1] - width))

    run_batch(requests[:2])  # warm up
    while True:
        try:
            gpubench.sync(device)
            start = time.perf_counter()
            generated = 0
            for i in range(0, len(requests), batch_size):
                generated += run_batch(requests[i : i + batch_size])
            gpubench.sync(device)
            elapsed = time.perf_counter() - start
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
    useful = sum(n for _, n in requests)
    return {
        "batch_size": batch_size,
        "output_tokens": useful,
        "generated_tokens_including_padding_waste": generated,
        "seconds": elapsed,
        "output_tokens_per_s": useful / elapsed,
        "transformers": transformers.__version__,
    }


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b", help="a loader preset (dummy weights)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--skip-hf", action="store_true", help="only kubellm")
    args = parser.parse_args()
    if args.smoke:
        args.num_requests, args.min_len, args.max_len = 5, 3, 9
        args.max_num_seqs, args.max_num_batched_tokens = 4, 32
    device = gpubench.setup(args)

    with tempfile.TemporaryDirectory() as workdir:
        source, hf_config = gpubench.model_source(args.model, args.smoke, Path(workdir))
        requests = make_workload(args.num_requests, args.min_len, args.max_len, hf_config["vocab_size"])
        results: dict[str, Any] = {"kubellm": run_kubellm(args, source, requests)}
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if args.skip_hf:
        results["transformers"] = None
    else:
        try:
            results["transformers"] = run_hf(args, hf_config, requests, device)
        except ImportError as error:
            results["transformers"] = {"error": f"transformers not importable: {error}"}
    ours = results["kubellm"]["output_tokens_per_s"]
    hf = (results["transformers"] or {}).get("output_tokens_per_s")
    results["speedup_vs_transformers"] = ours / hf if hf else None
    workload = {
        "model": args.model, "weights": "dummy", "num_requests": args.num_requests,
        "prompt_len": [args.min_len, args.max_len], "output_len": [args.min_len, args.max_len], "seed": 0,
        "ignore_eos": True, "temperature": 0.6, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }  # fmt: skip
    path = gpubench.write_result("offline_throughput", args, device, workload, results)
    print(f"wrote {path}")
    rows: list[list[object]] = [["kubellm", ours, results["kubellm"]["seconds"], "continuous"]]
    if hf:
        t = results["transformers"]
        rows.append([f"transformers {t['transformers']}", hf, t["seconds"], f"static x{t['batch_size']}"])
    gpubench.print_table(["engine", "output tok/s", "seconds", "batching"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
