#!/usr/bin/env bash
# Sets up the LLM peers that benchmarks/llm_bench.py compares inferd with, under benchmarks/.venvs/
# (git-ignored), so nothing touches inferd's .venv:
#
#   transformers   `transformers serve` (transformers[serving]) in .venvs/transformers, with torch==2.13.0
#                  (the CPU wheel on this machine's disk) pinned first
#   llama.cpp      llama-server built from the llama.cpp that the llama-cpp-python sdist vendors, into
#                  .venvs/llama.cpp/bin/ (about 15 min on 2 cores); then llama.cpp-f32
#   llama.cpp-f32  an F32 GGUF of the bundled SmolLM2 weights, in .venvs/llama.cpp/models/: the HF folder
#                  inferd converts the Q4_1 GGUF into, converted back by the vendored convert_hf_to_gguf.py
#                  (run in the transformers venv: it needs torch, transformers and sentencepiece)
#   llama.cpp-q8   a Q8_0 GGUF of the same weights, the peer of `inferd serve --quantization int8`: the
#                  bundled Q4_1 GGUF requantised by the llama-quantize built with llama-server (each
#                  tensor dequantised, then quantised to Q8_0; no transformers venv needed)
#
# vLLM's CPU build is shared with the embedding benchmark: `bash benchmarks/setup_peers.sh vllm`.
#
#   bash benchmarks/setup_llm_peers.sh                 # all four, in that order
#   bash benchmarks/setup_llm_peers.sh llama.cpp       # just some
#
# Override the versions with LLAMA_CPP_PYTHON_VERSION (whose vendored llama.cpp is built) and
# TRANSFORMERS_VERSION, the interpreter with PYTHON, the build's parallelism with JOBS.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
JOBS="${JOBS:-2}"
INFERD_PY="$ROOT/.venv/bin/python"
LLAMA_DIR="$VENVS/llama.cpp"
F32_GGUF="$LLAMA_DIR/models/SmolLM2-135M-Instruct-f32.gguf"
Q8_GGUF="$LLAMA_DIR/models/SmolLM2-135M-Instruct-q8_0.gguf"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
SRC=""

# Downloads and unpacks the llama-cpp-python sdist once; SRC is its vendored llama.cpp.
fetch_llamacpp() {
  [[ -n "$SRC" ]] && return
  # The sdist, never a wheel: the wheel has the library but not the server.
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$TMP" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" 2> >(grep -v '^WARNING: Location' >&2)
  tar -xzf "$TMP"/llama_cpp_python-*.tar.gz -C "$TMP"
  SRC="$(echo "$TMP"/llama_cpp_python-*/vendor/llama.cpp)"
}

setup_llamacpp() {
  fetch_llamacpp
  # Static libraries: the binary then runs from anywhere without the build tree's .so files.
  # GGML_NATIVE: built for this CPU (AVX-512 and AMX where it has them), as a local install would be.
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > "$TMP/cmake.log" 2>&1 || {
    tail -n 40 "$TMP/cmake.log" >&2
    exit 1
  }
  cmake --build "$SRC/build" --target llama-server llama-quantize -j "$JOBS" > "$TMP/build.log" 2>&1 || {
    tail -n 40 "$TMP/build.log" >&2
    exit 1
  }
  mkdir -p "$LLAMA_DIR/bin"
  install -m 755 "$SRC/build/bin/llama-server" "$LLAMA_DIR/bin/llama-server"
  install -m 755 "$SRC/build/bin/llama-quantize" "$LLAMA_DIR/bin/llama-quantize"
  # The sdist carries the submodule's git metadata: name the llama.cpp commit too.
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist, llama.cpp $(git -C "$SRC" rev-parse --short=8 HEAD \
    2>/dev/null || echo '?')" > "$LLAMA_DIR/SOURCE"
  echo "llama.cpp: $("$LLAMA_DIR/bin/llama-server" --version 2>&1 | grep -i '^version' || true) ($(cat "$LLAMA_DIR/SOURCE"))"
}

setup_llamacpp_f32() {
  local py="$VENVS/transformers/bin/python" hf_dir
  if [[ ! -x "$py" ]]; then
    echo "llama.cpp-f32: needs the transformers venv for its converter: set up transformers first" >&2
    exit 1
  fi
  fetch_llamacpp
  # The HF folder is inferd's own conversion of the bundled GGUF (fp32 safetensors, tokenizer, template).
  hf_dir="$("$INFERD_PY" -c 'from inferd.hub.bundled import bundled_model_path as b
from inferd.hub.gguf import converted_gguf as c
print(c(b("smollm2-135m-instruct")))')"
  mkdir -p "$(dirname "$F32_GGUF")"
  # The vendored gguf-py goes with the vendored script.
  if ! PYTHONPATH="$SRC/gguf-py" "$py" "$SRC/convert_hf_to_gguf.py" "$hf_dir" --outtype f32 \
      --outfile "$F32_GGUF" > "$TMP/convert.log" 2>&1; then
    tail -n 20 "$TMP/convert.log" >&2
    echo "llama.cpp-f32: the conversion failed" >&2
    exit 1
  fi
  echo "llama.cpp-f32: $F32_GGUF from $hf_dir"
}

setup_llamacpp_q8() {
  local quantize="$LLAMA_DIR/bin/llama-quantize" q41
  if [[ ! -x "$quantize" ]]; then
    echo "llama.cpp-q8: needs llama-quantize: set up llama.cpp first" >&2
    exit 1
  fi
  q41="$("$INFERD_PY" -c 'from inferd.hub.bundled import bundled_model_path as b; print(b("smollm2-135m-instruct"))')"
  mkdir -p "$(dirname "$Q8_GGUF")"
  if ! "$quantize" --allow-requantize "$q41" "$Q8_GGUF" Q8_0 > "$TMP/quantize.log" 2>&1; then
    tail -n 20 "$TMP/quantize.log" >&2
    echo "llama.cpp-q8: the requantisation failed" >&2
    exit 1
  fi
  echo "llama.cpp-q8: $Q8_GGUF from $q41"
}

setup_transformers() {
  local venv="$VENVS/transformers"
  rm -f "$venv/.bench-ready"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON" -m venv "$venv"
  fi
  # torch first, pinned: the CPU wheel on this machine's disk; transformers' range then admits it.
  # sentencepiece is for llama.cpp's converter (setup_llamacpp_f32), which imports it for Llama models.
  "$venv/bin/pip" install -q "$TORCH" 2> >(grep -v '^WARNING: Location' >&2)
  "$venv/bin/pip" install -q "transformers[serving]==$TRANSFORMERS_VERSION" sentencepiece \
    2> >(grep -v '^WARNING: Location' >&2)
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
  peers=(transformers llama.cpp llama.cpp-f32 llama.cpp-q8)
fi
for peer in "${peers[@]}"; do
  case "$peer" in
    transformers) setup_transformers ;;
    llama.cpp) setup_llamacpp ;;
    llama.cpp-f32) setup_llamacpp_f32 ;;
    llama.cpp-q8) setup_llamacpp_q8 ;;
    *) echo "unknown peer: $peer (known: transformers, llama.cpp, llama.cpp-f32, llama.cpp-q8; vllm: setup_peers.sh)" >&2
       exit 2 ;;
  esac
done
