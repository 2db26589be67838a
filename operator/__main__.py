"""`python -m kubellm.operator` = `kubellm operator` (without importing the runtime's command table)."""

from __future__ import annotations

import argparse
import sys

from kubellm.operator import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubellm operator", description=cli.__doc__)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
