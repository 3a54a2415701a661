#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh needs on a GPU machine whose Python (3.12, x86-64) has torch but lacks
# these (the workplace's CUDA image: see /work/.library/device/KINDS.md). Run HERE, where pip can reach PyPI;
# the wheels land in .whl/ (git-ignored), which the device run carries: `carry: [".whl"]`.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
for pkg in pydantic pydantic_core annotated_types typing_inspection diffusers; do
  v=$(version "$pkg")
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg${v:+==$v}"
done
ls -l .whl
