#!/usr/bin/env bash
# GPU check of the paper-scale paths, in under 8 minutes on one H200; every step is time-bounded.
#
#   bash benchmarks/gpu_check.sh        # on a CUDA machine, from anywhere; Python: $PYTHON or python3
#
#   1. environment: GPU name, torch/CUDA versions; wheels from .whl/ (if present) into /tmp/site
#   2. pytest -m gpu tests/test_gpu.py   bf16 autocast steps, KV-cache sampler CUDA == CPU, CUDA-graph
#                                        inverse == eager, torch.compile training, FLOP counter, VAE on CUDA,
#                                        a bf16 latent stage-2 step with the perceptual loss through the VAE
#   3. benchmarks/bench.py at the paper's geometry and B/2 sizes (32x32x4 latent, patch 2, 256 tokens;
#      forward 'B' ~121M, reverse 'B' ~129M, 1000 classes), batches 1 and 64: training images/s of both
#      stages, 1-NFE and exact ms/image (guidance, denoising), ratios, 1-NFE FLOP/s vs the matmul peak
#
# Writes into $OUT (or benchmarks/ when OUT is unset): gpu_check.json (summary + the benchmark), bench.json,
# pytest_gpu.log, bench.log. Exit status: 0 when every step passed.
#
# Packages: the machine's Python needs torch with CUDA, numpy, einops, pyyaml, tqdm, scipy, scikit-learn,
# pillow, pyarrow, pytest, and pydantic (+ diffusers for the VAE test). On the workplace's CUDA image the
# last two are missing: run `bash benchmarks/gpu_wheels.sh` where pip works, and carry .whl/ along.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
declare -A RC SECS

step() {  # step NAME LIMIT_S COMMAND...: run with a hard time limit, record exit status and seconds
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  RC[$name]=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  echo "=== $name: exit ${RC[$name]} after ${SECS[$name]}s"
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step environment 60 "$PY" -c "import torch, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
step pytest_gpu 150 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT_DIR/pytest_gpu.xml" \
  > >(tee "$OUT_DIR/pytest_gpu.log") 2>&1
# BENCH_ARGS / DEVICE override the benchmark, e.g. a dry run on a CPU: DEVICE=cpu BENCH_ARGS="--settings digits --quick"
step bench 240 "$PY" benchmarks/bench.py --device "${DEVICE:-cuda}" ${BENCH_ARGS:---settings paper-B --batches 1 64 --repeats 3} \
  --out "$OUT_DIR/bench.json" > >(tee "$OUT_DIR/bench.log") 2>&1

SUMMARY_RC=$(for k in "${!RC[@]}"; do echo "$k=${RC[$k]}"; done | paste -sd, -)
SUMMARY_SECS=$(for k in "${!SECS[@]}"; do echo "$k=${SECS[$k]}"; done | paste -sd, -)
timeout 30 "$PY" - "$OUT_DIR" "$SUMMARY_RC" "$SUMMARY_SECS" "$(( $(date +%s) - START ))" <<'EOF'
import json, re, sys
from pathlib import Path
out, rcs, secs, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
pairs = lambda s: {k: int(v) for k, v in (p.split("=") for p in s.split(",") if p)}
log = out / "pytest_gpu.log"
tail = [l for l in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)][-1:] if log.exists() else []
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
summary = {"exit": pairs(rcs), "seconds": pairs(secs), "total_seconds": total, "pytest": tail[0] if tail else None,
           "bench": bench}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1))
EOF
for k in "${!RC[@]}"; do [ "${RC[$k]}" -eq 0 ] || exit 1; done
echo "gpu_check: all steps passed in $(( $(date +%s) - START ))s"
