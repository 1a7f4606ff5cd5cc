#!/bin/bash
# Resident memory of the default trio (`inferd serve`, no flags: chat + embeddings + rerank) when
# ready and at its peak under 32 chat streams (64 prompts) plus 40 embedding requests.
# Usage: bash benchmarks/trio_rss.sh   (from the repository root, after `make install-dev`)
set -euo pipefail
PORT=$((20000 + RANDOM % 10000))
.venv/bin/inferd serve --port "$PORT" --log-level warning > /tmp/inferd-trio-rss.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "localhost:$PORT/ready" > /dev/null && break; sleep 1; done
echo "ready: $(grep VmRSS /proc/$PID/status)"
for _ in $(seq 40); do
  curl -s "localhost:$PORT/v1/embeddings" -H 'content-type: application/json' \
    -d '{"model":"all-minilm-l6-v2","input":["a passage about cats and dogs and the weather today in the city"]}' > /dev/null
done &
.venv/bin/python benchmarks/llm_bench.py --url "http://127.0.0.1:$PORT" --peers none --levels 32 --prompts 64 --max-tokens 128 | grep -E "^c="
wait %2 2>/dev/null || true
echo "peak: $(grep VmHWM /proc/$PID/status)"
