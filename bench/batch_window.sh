#!/usr/bin/env bash
# Measures the child's --batch-window-ms: the same sweep at each window, one after the other.
# Usage: bench/batch_window.sh [windows...]   (default: 0 2 10 50)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=$($PY -c "from router.bundled_models import SMOLLM2, resolve_package_model; print(resolve_package_model(SMOLLM2))")
for window in "${@:-0 2 10 50}"; do
  for w in $window; do
    port=$($PY -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
    $PY -m child -m "$MODEL" -t 2 -c 4096 -np 8 --port "$port" --batch-window-ms "$w" 2>/dev/null &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done
    $PY -m router bench --url "http://127.0.0.1:$port" --concurrency 1,8 --requests 16 --name "batch window $w ms"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
