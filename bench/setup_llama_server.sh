#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (and `llama-quantize`) for bench/serve.py's side-by-side mode, once, into
# ~/.cache/kubellm/llama.cpp.
#
#   bench/setup_llama_server.sh          prints the path of the binary (building it first if needed)
#
# The source comes from the llama-cpp-python sdist (it vendors llama.cpp), fetched with pip, so no git clone
# and no network other than the package index. About 4 minutes on 2 cores. Set LLAMA_CPP_PYTHON_VERSION to pin.
set -euo pipefail

CACHE="${KUBELLM_CACHE:-$HOME/.cache/kubellm}/llama.cpp"
BIN="$CACHE/llama-server"
if [[ -x "$BIN" && -x "$CACHE/llama-quantize" ]]; then
    echo "$BIN"
    exit 0
fi

PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fetching the $SPEC source distribution" >&2
"$PY" -m pip download --quiet --no-binary llama-cpp-python --no-deps -d "$WORK/dl" "$SPEC" >&2
tar -xzf "$WORK"/dl/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
[[ -f "$SRC/CMakeLists.txt" ]] || { echo "no vendored llama.cpp in the sdist" >&2; exit 1; }

echo "building llama-server from $SRC (a few minutes)" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$WORK/build" --target llama-server llama-quantize -j"${JOBS:-2}" >&2

# The binary links the ggml/llama shared libraries it just built: keep them beside it.
mkdir -p "$CACHE/lib"
find "$WORK/build" -name '*.so*' -exec cp -a {} "$CACHE/lib/" \;
# llama-quantize beside it: bench/serve.py makes the Q4_K_M file of the bundled model with llama.cpp's own tool
for tool in llama-quantize llama-server; do
    cp "$WORK/build/bin/$tool" "$CACHE/$tool.bin"
    cat > "$CACHE/$tool" <<EOF
#!/usr/bin/env bash
LD_LIBRARY_PATH="$CACHE/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$CACHE/$tool.bin" "\$@"
EOF
    chmod +x "$CACHE/$tool"
done
echo "$BIN"
