"""`kubellm generate`: streams a real continuation to stdout; bad values are a clear error naming the field."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.runtime import generate_cli


@pytest.mark.slow
def test_generate_streams_text_to_stdout() -> None:
    kubellm = Path(sys.executable).parent / "kubellm"
    result = subprocess.run(
        [
            str(kubellm),
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_sampling_value_is_reported_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    args = parser.parse_args(["--prompt", "hi", "--top-p", "1.5"])
    assert generate_cli.run(args) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
