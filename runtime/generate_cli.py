"""``kubellm generate``: offline generation from one prompt, streaming the text to stdout as it is produced.

kubellm generate --prompt "Why is the sky blue?" --max-tokens 64 --temperature 0
"""

from __future__ import annotations

import argparse
import sys

from .config import DTYPES, QUANTIZATIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="builtin:<name>, a Hugging Face model directory or a .gguf file",
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the model's chat template as a user message (default: on)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATIONS)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks splitting each layer")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="stages of contiguous layers")


def run(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .outputs import RequestOutput
    from .sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
        )
        llm = LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"kubellm generate: {e}", file=sys.stderr)
        return 2

    def show(delta: RequestOutput) -> None:
        for choice in delta.outputs:
            sys.stdout.write(choice.text)
        sys.stdout.flush()

    prompt: str | list[int] = args.prompt
    if args.chat and llm.tokenizer is not None and llm.tokenizer.chat_template:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    try:
        llm.generate([prompt], params, on_delta=show)
    except ValueError as e:
        print(f"\nkubellm generate: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0
