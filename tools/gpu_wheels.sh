#!/usr/bin/env bash
# Gather into wheels/ what tools/gpu_check.py needs beyond PyTorch and timm, for a GPU machine
# that cannot reach a package index: the versions this checkout's environment has, as wheels
# for x86-64 Linux and the GPU machine's CPython (3.12 unless PYTHON_VERSION says otherwise).
# Packages published only as source (pure Python) are built into wheels here.
#
#   bash tools/gpu_wheels.sh [OUT]           # default OUT: wheels/
#   then, on the GPU machine:
#   pip install --no-index --no-deps --find-links wheels/ -r wheels/requirements.txt
#
# numpy, pyyaml, psutil, py-cpuinfo, msgpack, ninja, packaging, tqdm, pillow and typing-extensions
# are left out: a machine with PyTorch and timm has them. FFCV is left out too: it builds against
# OpenCV and libjpeg-turbo; gpu_check.py reports its loader as skipped without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYTHON_VERSION:-3.12}
OUT=${1:-wheels}
LIMIT_MB=64
PACKAGES=(
  deepspeed hjson pydantic pydantic_core annotated-types typing-inspection einops  # DeepSpeed
  fairscale webdataset braceexpand omegaconf simplejpeg
)

"$PY" -m pip --version >/dev/null || { echo "error: $PY has no pip; set PYTHON=/path/to/python" >&2; exit 2; }
mkdir -p "$OUT"
: >"$OUT/requirements.txt"
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  if [ -z "$version" ]; then
    echo "error: $name is not installed in $PY's environment; run 'make setup' first" >&2
    exit 2
  fi
  echo "$name==$version" >>"$OUT/requirements.txt"
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$OUT" "$name==$version" 2>/dev/null; then
    echo "  $name==$version"
  else  # a source-only package: built here (pure Python, so the wheel fits any CPython)
    if ! log=$("$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$name==$version" 2>&1); then
      echo "$log" >&2
      echo "error: no wheel for $name==$version" >&2
      exit 1
    fi
    echo "  $name==$version (built here)"
  fi
done
size_mb=$(du -sm "$OUT" | cut -f1)
echo "$OUT: $(find "$OUT" -name '*.whl' | wc -l) wheels, ${size_mb} MiB"
if [ "$size_mb" -ge "$LIMIT_MB" ]; then
  echo "error: $OUT is ${size_mb} MiB, over the ${LIMIT_MB} MiB a GPU machine's copy of the tree may hold" >&2
  exit 1
fi
