#!/usr/bin/env bash
# A screenshot of MLflow's compare view for the runs of an experiment, taken with headless
# Chromium (the page is rendered client-side, so curl cannot check it).
#
#   tools/screenshot_compare.sh [EXPERIMENT] [OUT.png] [BACKEND_URI]
#     EXPERIMENT   default lsa_demo
#     OUT.png      default runs/mlflow_compare.png
#     BACKEND_URI  default sqlite:///$PWD/mlflow.db (what training uses)
#
# Needs: chromium (apt-get install chromium) and the project's .venv (mlflow).
set -euo pipefail
EXPERIMENT="${1:-lsa_demo}"
OUT="${2:-runs/mlflow_compare.png}"
URI="${3:-sqlite:///$PWD/mlflow.db}"
PY="${PYTHON:-.venv/bin/python}"
BROWSER="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$BROWSER" ] || { echo "error: no chromium found; apt-get install chromium" >&2; exit 1; }
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$(dirname "$OUT")"
ARTIFACTS="$(mktemp -d)"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$PY" -m mlflow server --backend-store-uri "$URI" \
  --artifacts-destination "$ARTIFACTS" --host 127.0.0.1 --port "$PORT" --workers 1 >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$ARTIFACTS"' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
URL="$("$PY" - "$URI" "$EXPERIMENT" "$PORT" <<'PYEOF'
import json, sys, urllib.parse
from mlflow import MlflowClient
uri, name, port = sys.argv[1:]
client = MlflowClient(uri)
experiment = client.get_experiment_by_name(name)
if experiment is None:
    sys.exit(f"error: no experiment {name!r} at {uri}")
runs = [r.info.run_id for r in client.search_runs([experiment.experiment_id], max_results=10)]
query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([experiment.experiment_id])})
print(f"http://127.0.0.1:{port}/#/compare-runs?{query}")
PYEOF
)"
"$BROWSER" --headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$(mktemp -d)" --window-size=1600,1100 --virtual-time-budget=20000 \
  --screenshot="$OUT" "$URL" >/dev/null 2>&1
echo "wrote $OUT ($URL)"
