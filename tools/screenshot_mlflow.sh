#!/usr/bin/env bash
# A screenshot of a page of MLflow's UI, taken with headless Chromium (the UI is rendered
# client-side, so curl cannot check it), from a temporary `mlflow server` on the runs' backend.
#
#   tools/screenshot_mlflow.sh compare  [EXPERIMENT] [OUT.png] [BACKEND_URI]
#       the compare view of the experiment's latest 10 runs
#   tools/screenshot_mlflow.sh artifact EXPERIMENT RUN_NAME ARTIFACT [OUT.png] [BACKEND_URI]
#       the artifact view of one run (the latest named RUN_NAME), ARTIFACT selected,
#       e.g. attention/step_00000660.png
#     EXPERIMENT   default lsa_demo
#     OUT.png      default runs/mlflow_<page>.png
#     BACKEND_URI  default sqlite:///$PWD/mlflow.db (what training uses)
#
# WINDOW=W,H sets the browser window (default 1600,1100).
# Needs: chromium (apt-get install chromium) and the project's .venv (mlflow).
set -euo pipefail
PAGE="${1:-compare}"
case "$PAGE" in
  compare) EXPERIMENT="${2:-lsa_demo}"; RUN=""; ARTIFACT=""; OUT="${3:-runs/mlflow_compare.png}"; URI="${4:-}" ;;
  artifact)
    [ $# -ge 4 ] || { echo "error: artifact needs EXPERIMENT RUN_NAME ARTIFACT; see the header of $0" >&2; exit 2; }
    EXPERIMENT="$2"; RUN="$3"; ARTIFACT="$4"; OUT="${5:-runs/mlflow_artifact.png}"; URI="${6:-}" ;;
  *) echo "error: unknown page '$PAGE': use compare or artifact" >&2; exit 2 ;;
esac
URI="${URI:-sqlite:///$PWD/mlflow.db}"
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
URL="$("$PY" - "$URI" "$EXPERIMENT" "$PORT" "$RUN" "$ARTIFACT" <<'PYEOF'
import json, sys, urllib.parse
from mlflow import MlflowClient
uri, name, port, run_name, artifact = sys.argv[1:]
client = MlflowClient(uri)
experiment = client.get_experiment_by_name(name)
if experiment is None:
    sys.exit(f"error: no experiment {name!r} at {uri}")
ids = [experiment.experiment_id]
if not run_name:
    runs = [r.info.run_id for r in client.search_runs(ids, max_results=10)]
    query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps(ids)})
    print(f"http://127.0.0.1:{port}/#/compare-runs?{query}")
    sys.exit()
found = client.search_runs(ids, f"attributes.run_name = '{run_name}'", max_results=1)
if not found:
    sys.exit(f"error: no run named {run_name!r} in experiment {name!r}")
run_id = found[0].info.run_id
folder = artifact.rpartition("/")[0]
if artifact not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
    sys.exit(f"error: run {run_name!r} has no artifact {artifact!r}")
print(f"http://127.0.0.1:{port}/#/experiments/{ids[0]}/runs/{run_id}/artifacts/{urllib.parse.quote(artifact)}")
PYEOF
)"
"$BROWSER" --headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$(mktemp -d)" --window-size="${WINDOW:-1600,1100}" --virtual-time-budget=20000 \
  --screenshot="$OUT" "$URL" >/dev/null 2>&1
echo "wrote $OUT ($URL)"
