#!/usr/bin/env bash
# The one prepared device run for the H100: install, full-size correctness, then the benchmark.
#
# Make exactly this call with the device tool (from a session whose task has a GPU; it runs
# in the repo root of a copy of the working tree; the H100 image has jax 0.11.2 with CUDA):
#
#   run(command="bash benchmarks/run_h100.sh", timeout_s=540)
#
# Budget: ~15 min of device time per session in all, start-up (1-2 min) included, so this
# script stops itself inside 8 min: h100_check gets at most 180 s; the benchmark starts no
# new work once the script has run SCRIPT_BUDGET_S - 60 s and is killed at SCRIPT_BUDGET_S
# (default 440 s). It writes its JSON after every row, so a cut run keeps what it measured.
# Everything it produces lands in $OUT (the tool copies it back): run.log, the benchmark
# JSON (also under benchmarks/results/ on the device) and h100_check.log. Commit the JSON
# under benchmarks/results/. Give the machine back (give_back) unless rerunning at once.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${SCRIPT_BUDGET_S:-440}
OUT=${OUT:-/tmp/siglip_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
PY=${PYTHON:-$(command -v python3 || command -v python)}

echo "== install (offline, no deps) =="
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . ; then
  echo "pip install -e . failed; falling back to a PYTHONPATH shim"
fi
if ! "$PY" -c "import siglip_fast.kernels.gpu" 2>/dev/null; then
  # The package maps kernels/ and reference/ under siglip_fast (pyproject package-dir).
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/siglip_fast"
  cp -r siglip_fast/. "$SHIM/siglip_fast/"
  ln -s "$PWD/kernels" "$SHIM/siglip_fast/kernels"
  ln -s "$PWD/reference" "$SHIM/siglip_fast/reference"
  export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import siglip_fast.kernels.gpu" || { echo "cannot import siglip_fast"; exit 3; }
fi

echo "== device =="
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version \
  --format=csv || nvidia-smi || true
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

echo "== h100_check ($(elapsed)s) =="
timeout 180 "$PY" -m benchmarks.h100_check 2>&1 | tee "$OUT/h100_check.log"
CHECK_RC=${PIPESTATUS[0]}
echo "h100_check exit code: $CHECK_RC"

REMAIN=$(( BUDGET - $(elapsed) ))
echo "== bench_loss ($(elapsed)s elapsed, ${REMAIN}s left) =="
# The benchmark's own budget leaves ~60 s for the run in flight when it stops starting work
# (the largest single entry, the B = 1M value-and-grad, is a few calls of ~10 s each).
timeout $(( REMAIN > 60 ? REMAIN : 60 )) \
  "$PY" -m benchmarks.bench_loss --budget-s $(( REMAIN > 120 ? REMAIN - 60 : 60 ))
BENCH_RC=$?
echo "bench_loss exit code: $BENCH_RC"
cp benchmarks/results/bench_gpu_*.json "$OUT/" 2>/dev/null || true
ls -la "$OUT"
echo "== h100_check summary =="
tail -n 7 "$OUT/h100_check.log"
echo "== done in $(elapsed)s: h100_check rc=$CHECK_RC, bench rc=$BENCH_RC =="
if [ "$CHECK_RC" -ne 0 ]; then exit "$CHECK_RC"; fi
exit "$BENCH_RC"
