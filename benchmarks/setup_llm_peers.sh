#!/usr/bin/env bash
# Sets up the LLM peers that benchmarks/llm_bench.py compares inferd with, under benchmarks/.venvs/
# (git-ignored), so nothing touches inferd's .venv:
#
#   llama.cpp      llama-server built from the llama.cpp that the llama-cpp-python sdist vendors, into
#                  .venvs/llama.cpp/bin/; plus an F32 GGUF of the bundled SmolLM2 weights (the HF folder
#                  inferd converts the Q4_1 GGUF into, converted back by llama.cpp's convert_hf_to_gguf.py)
#                  into .venvs/llama.cpp/models/ for the llama.cpp-f32 row
#   transformers   `transformers serve` (transformers[serving]) in .venvs/transformers
#
# vLLM's CPU build is shared with the embedding benchmark: `bash benchmarks/setup_peers.sh vllm`.
#
#   bash benchmarks/setup_llm_peers.sh                 # both
#   bash benchmarks/setup_llm_peers.sh llama.cpp       # just one (names: llama.cpp, transformers)
#
# Override the versions with LLAMA_CPP_PYTHON_VERSION (whose vendored llama.cpp is built) and
# TRANSFORMERS_VERSION, the interpreter with PYTHON, the build's parallelism with JOBS.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
JOBS="${JOBS:-2}"
INFERD_PY="$ROOT/.venv/bin/python"

setup_llamacpp() {
  local dest="$VENVS/llama.cpp" tmp src
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  # The sdist, never a wheel: the wheel has the library but not the server.
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$tmp" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src="$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)"
  # Static libraries: the binary then runs from anywhere without the build tree's .so files.
  # GGML_NATIVE: built for this CPU (AVX-512 and AMX where it has them), as a local install would be.
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > "$tmp/cmake.log"
  cmake --build "$src/build" --target llama-server -j "$JOBS" > "$tmp/build.log" 2>&1 || {
    tail -n 40 "$tmp/build.log" >&2
    exit 1
  }
  mkdir -p "$dest/bin" "$dest/models"
  install -m 755 "$src/build/bin/llama-server" "$dest/bin/llama-server"
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist, vendor/llama.cpp" > "$dest/SOURCE"
  "$dest/bin/llama-server" --version 2>&1 | grep -i version || true

  # The F32 GGUF, converted with the vendored script and gguf-py; inferd's .venv has its other needs
  # (torch, transformers, numpy), and the HF folder is inferd's own conversion of the bundled GGUF.
  local hf_dir
  hf_dir="$("$INFERD_PY" -c 'from inferd.hub.bundled import bundled_model_path as b
from inferd.hub.gguf import converted_gguf as c
print(c(b("smollm2-135m-instruct")))')"
  if PYTHONPATH="$src/gguf-py" "$INFERD_PY" "$src/convert_hf_to_gguf.py" "$hf_dir" --outtype f32 \
      --outfile "$dest/models/SmolLM2-135M-Instruct-f32.gguf" > "$tmp/convert.log" 2>&1; then
    echo "llama.cpp: F32 GGUF at $dest/models/SmolLM2-135M-Instruct-f32.gguf"
  else
    tail -n 20 "$tmp/convert.log" >&2
    echo "llama.cpp: the F32 GGUF conversion failed; the llama.cpp-f32 row will be skipped" >&2
  fi
}

setup_transformers() {
  local venv="$VENVS/transformers"
  rm -f "$venv/.bench-ready"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON" -m venv "$venv"
  fi
  # torch first, pinned: the CPU wheel on this machine's disk; transformers' range then admits it.
  "$venv/bin/pip" install -q "$TORCH"
  "$venv/bin/pip" install -q "transformers[serving]==$TRANSFORMERS_VERSION"
  local out
  if ! out="$("$venv/bin/transformers" serve --help 2>&1)"; then
    printf '%s\n' "$out" | tail -n 30 >&2
    echo "transformers: installed, but \`transformers serve --help\` failed" >&2
    exit 1
  fi
  touch "$venv/.bench-ready"
  echo "transformers: $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))')"
}

mkdir -p "$VENVS"
peers=("$@")
if [[ ${#peers[@]} -eq 0 ]]; then
  peers=(llama.cpp transformers)
fi
for peer in "${peers[@]}"; do
  case "$peer" in
    llama.cpp) setup_llamacpp ;;
    transformers) setup_transformers ;;
    *) echo "unknown peer: $peer (known: llama.cpp, transformers; vllm: setup_peers.sh)" >&2; exit 2 ;;
  esac
done
