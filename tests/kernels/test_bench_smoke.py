"""Every GPU benchmark script still runs end to end: its --smoke mode on the CPU (Triton interpreter), as a
subprocess, writing its JSON. The numbers of a smoke run mean nothing; only that the script works is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench" / "gpu"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "gpubench")
# what each benchmark's results must report
EXPECTED_RESULTS = {
    "ceilings": ["copy_1MiB_gbs"],
    "decode_attention": ["copy_bandwidth_gbs", "variants", "default_fraction_of_copy", "target_met", "split_k_sweep"],
    "decode_step": ["step_ms_median", "roofline_step_ms", "fraction_of_roofline", "attention_backend"],
    "offline_throughput": ["kubellm", "transformers", "speedup_vs_transformers"],
    "prefix_caching": ["ttft_ms_uncached_median", "ttft_ms_cached_median", "cached_tokens_per_request"],
    "smollm2": ["single_stream_decode_tokens_per_s", "streams_2_output_tokens_per_s"],
    "tp": ["runs", "tp2_over_tp1_decode_step"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONSAFEPATH": "1", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_every_script_is_covered() -> None:
    assert set(SCRIPTS) == set(EXPECTED_RESULTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_smoke(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{name} --smoke failed:\n{result.stdout}\n{result.stderr}"
    (path,) = tmp_path.glob(f"{name}-cpu-smoke.json")
    payload = json.loads(path.read_text())
    assert payload["smoke"] is True and payload["benchmark"] == name
    assert payload["machine"]["torch"] and payload["machine"]["triton"]
    for key in EXPECTED_RESULTS[name]:
        assert payload["results"].get(key) is not None, f"{name}: results lack {key!r}: {payload['results']}"
    assert "---" in result.stdout, "each script prints its table last"


@pytest.mark.slow
def test_run_gpu_script_runs_a_subset(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "run_gpu.sh"), "--smoke", "ceilings"],
        env={**_env(), "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "ceilings-cpu-smoke.json").is_file()
    assert "ceilings" in result.stdout.split("=== summary")[-1]
    failing = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "run_gpu.sh"), "--smoke", "no_such_benchmark"],
        env={**_env(), "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failing.returncode != 0


def test_benchmark_import_path_avoids_packages_the_gpu_machine_lacks() -> None:
    # the device machine has torch, triton, transformers, tokenizers, jinja2, safetensors; not pydantic (and the
    # benchmarks should not need the server's aiohttp either)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import gpubench\n"
        "gpubench.ensure_kubellm()\n"
        "import kubellm.runtime.llm, kubellm.runtime.kernels.backend, kubellm.runtime.kernels.dispatch\n"
        "import kubellm.runtime.kernels.fused, kubellm.runtime.models.loader, kubellm.runtime.tokenizer\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'aiohttp', 'kopf', 'kubernetes', 'gguf'})\n"
        "assert not bad, f'imported {bad}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
