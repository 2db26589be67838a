"""The ``kubellm`` command: ``kubellm serve | generate | download | operator | gateway``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep heavy imports (torch, kopf) inside ``run`` so that ``kubellm --help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("kubellm.runtime.server.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "generate": ("kubellm.runtime.generate_cli", "generate text offline from a prompt"),
    "download": ("kubellm.runtime.download", "download an hf:// model into a folder once, resumably (the loader Job)"),
    "operator": ("kubellm.operator.cli", "run the LLMDeployment operator"),
    "gateway": ("kubellm.gateway.cli", "route OpenAI requests to LLMDeployments by model and prefix; hold at zero"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description="Run large language models on Kubernetes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
        sub.set_defaults(module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
