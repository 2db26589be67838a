"""``kubellm generate``: offline generation from one prompt, streaming the text to stdout as it is produced.

kubellm generate --prompt "Why is the sky blue?" --max-tokens 64 --temperature 0
"""

from __future__ import annotations

import argparse
import sys

from . import config

# --seed is the sampling seed here (the engine's is left out); a served name means nothing offline.
_NOT_HERE = ("seed", "served_model_name", "nnodes", "node_rank", "master_addr", "master_port")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    # The engine's flags, generated from EngineConfig (runtime/config.py) as `kubellm serve`'s are; --seed above
    # is the sampling seed, so the engine's is left out. Server-only fields have no meaning here.
    config.add_arguments(parser.add_argument_group("model and engine"), exclude=_NOT_HERE)


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
        llm = LLM(**config.given(args, exclude=_NOT_HERE))
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
