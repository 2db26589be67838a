#!/usr/bin/env bash
# Run the GPU benchmarks (bench/gpu/*.py) on a CUDA machine; each writes $OUT/<name>-<gpu>.json and a log.
#
#   bench/run_gpu.sh                        # the kernel tests' CUDA variants, then every benchmark
#   bench/run_gpu.sh decode_attention ...   # a subset (the device tool allows 10 minutes per command)
#   bench/run_gpu.sh --smoke                # every script's tiny CPU run (what CI checks)
#
# OUT defaults to bench/results. Runs from a bare copy of the tree (no pip install needed: the scripts register
# the kubellm packages themselves). The SmolLM2 benchmark needs its GGUF file and the `gguf` package, which a
# bare GPU machine lacks: bench/gpu/prepare_carry.sh puts both under bench/gpu/build/carry/ (see bench/gpu/README.md).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONSAFEPATH=1
OUT="${OUT:-bench/results}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT"

smoke=()
names=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=(--smoke) ;;
    *) names+=("$arg") ;;
  esac
done
[ ${#names[@]} -eq 0 ] && names=(kernel_tests ceilings decode_attention decode_step offline_throughput prefix_caching smollm2 tp)

carry=bench/gpu/build/carry
if [ -d "$carry/pylib" ]; then
  export PYTHONPATH="$PWD/$carry/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
smollm2_args=()
if [ ${#smoke[@]} -eq 0 ]; then
  gguf="$carry/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$gguf" ] && compgen -G "$gguf.part-*" > /dev/null; then
    cat "$gguf".part-* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf && gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  [ -f "$gguf" ] && smollm2_args=(--model "$gguf")
fi

failed=()
summary=()
for name in "${names[@]}"; do
  if [ "$name" = kernel_tests ]; then
    # correctness before speed: the kernel tests' CUDA variants (GPU only; the CPU ones run in CI). The conftest
    # cut keeps the root conftest (control-plane fixtures and their packages) out of this bare machine.
    if [ ${#smoke[@]} -ne 0 ]; then continue; fi
    echo "=== kernel_tests"
    start=$(date +%s)
    "$PY" -m pytest -o addopts="" -p no:cacheprovider --confcutdir=tests/kernels -m gpu -q tests/kernels \
      --junitxml="$OUT/kernel_tests.xml" 2>&1 | tee "$OUT/kernel_tests.log"
    status=${PIPESTATUS[0]}
    summary+=("$(printf '%-20s exit %-3s %5ss' "$name" "$status" "$(( $(date +%s) - start ))")")
    [ "$status" -ne 0 ] && failed+=("$name")
    continue
  fi
  script="bench/gpu/$name.py"
  if [ ! -f "$script" ]; then
    echo "no such benchmark: $name" >&2
    failed+=("$name")
    continue
  fi
  extra=()
  [ "$name" = smollm2 ] && extra=("${smollm2_args[@]}")
  echo "=== $name"
  start=$(date +%s)
  "$PY" "$script" --out "$OUT" "${smoke[@]}" "${extra[@]}" 2>&1 | tee "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  summary+=("$(printf '%-20s exit %-3s %5ss' "$name" "$status" "$(( $(date +%s) - start ))")")
  [ "$status" -ne 0 ] && failed+=("$name")
done

echo "=== summary (results in $OUT)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
