#!/usr/bin/env bash
# System libraries the Python environment needs: FFCV builds against libturbojpeg and OpenCV;
# WebDataset reads http(s) shard URLs (data.urls) through curl; dataset-fashion-mnist ships the
# Fashion-MNIST files that tools/make_fashion_dataset.py writes out (make fashion).
# Installs the missing Debian/Ubuntu packages when run as root; otherwise says what to run.
set -euo pipefail
packages=(pkg-config libturbojpeg0-dev libopencv-dev g++ curl dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing system packages ${missing[*]} and no apt-get here; install their equivalents" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing system packages ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
