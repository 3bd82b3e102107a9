#!/usr/bin/env bash
# The GPU checks of issues 11 (§4) and 15 on a lent H100/H200, in under 8 minutes:
#   1. install: the carried wheels (.whl/, see below) into /tmp/site; CuPy from the image
#   2. the gpu-marked tests (pytest -m gpu)
#   3. CuPy vs NumPy (and CuPy --tf32) on one small classification (benchmarks/gpu_compare.py)
#   4. companion bench speed --device gpu at box 128, K 200, 20k particles (6 Å steady state)
#   5. companion bench scale --cluster gpus, when this checkout's bench scale has --cluster
# Results go to $OUT (at most 8 files come back from the device tool): summary.txt (the
# figures and each step's status), install.log, tests.log, compare.json, speed.txt,
# cluster.txt.
#
# On the device (device tool, from the repository root; a timeout that leaves a rerun):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Wheels, made here once (git-ignored .whl/; the device's python3 is 3.12 and reaches no
# registry): the project's pure dependencies the device image lacks, and Dask for step 5:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     starfile==0.5.13 mrcfile==1.5.4 cryosparc-tools==5.0.3 dask==2026.8.0 \
#     distributed==2026.8.0 tornado==6.6.1 tblib==3.2.2 zict==3.0.0 partd==1.4.2 \
#     locket==1.0.0 dask-cuda
# CuPy: the gpu extra names cupy-cuda12x; the H200 image already has cupy-cuda13x (CUDA 13,
# its driver's), and a CuPy wheel with its CUDA libraries is far over the tool's 64 MiB, so
# the image's CuPy is used (a cupy*.whl in .whl/ would be installed over it). The summary
# names the CuPy version that ran.
#
# GPU_CHECK_DRY=1: the same steps on the CPU at tiny sizes (no GPU: the gpu tests skip, the
# comparison uses the strict CuPy-like test module as the "GPU", the benches run on the CPU),
# to check the script itself where no device is lent.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for everything (the device tool allows 600)
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$SUMMARY" >&2; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
# step NAME SECONDS LOG CMD...: run CMD with a timeout (never past the whole budget)
step() {
  local name=$1 want=$2 log=$3
  shift 3
  local t
  t=$(left)
  [ "$want" -lt "$t" ] && t=$want
  if [ "$t" -lt 15 ]; then
    say "$name: SKIPPED (budget spent)"
    return 0
  fi
  say "$name: start (timeout ${t}s)"
  local s=$(date +%s) rc
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
  rc=$?
  local what=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
  [ $rc -ne 0 ] && [ "$what" = ok ] && what="FAILED (rc $rc)"
  say "$name: $what in $(($(date +%s) - s))s"
  return 0
}

if [ "$DRY" = 1 ]; then
  say "dry run (GPU_CHECK_DRY=1): CPU, tiny sizes"
  DEVICE=cpu N_SPEED=60 BOX_SPEED=32 K_SPEED=3 N_CMP=120 BOX_CMP=32 K_CMP=3
  CMP_DRY=--dry CLUSTER=local:2 N_CLUSTER=80 K_CLUSTER=2 BOX_CLUSTER=32
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  DEVICE=gpu N_SPEED=20000 BOX_SPEED=128 K_SPEED=200 N_CMP=2000 BOX_CMP=64 K_CMP=8
  CMP_DRY= CLUSTER=gpus N_CLUSTER=10000 K_CLUSTER=50 BOX_CLUSTER=128
  # ---- 1. install
  {
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    else
      echo "no .whl/ carried: using the image's packages only"
    fi
  } >"$OUT/install.log" 2>&1 || say "install: wheel install FAILED (see install.log)"
  export PYTHONPATH="$PWD:/tmp/site"
fi
export PYTHONUNBUFFERED=1
{
  "$PY" - <<'EOF'
import platform, numpy
print("python", platform.python_version(), "numpy", numpy.__version__)
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"] if n else b"-"
    print("cupy", cupy.__version__, "devices", n, name.decode() if isinstance(name, bytes) else name)
except Exception as exc:
    print("cupy: not usable:", type(exc).__name__, exc)
import companion
print("companion", companion.__file__)
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >>"$OUT/install.log" 2>&1
sed 's/^/  /' "$OUT/install.log" | tail -n 6 >>"$SUMMARY"

# ---- 2. gpu-marked tests
step tests 150 "$OUT/tests.log" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests
tail -n 3 "$OUT/tests.log" | sed 's/^/  /' >>"$SUMMARY"

# ---- 3. CuPy vs NumPy on one small classification (and the effect of --tf32)
step compare 120 "$OUT/compare.log" "$PY" benchmarks/gpu_compare.py $CMP_DRY \
  --n-particles $N_CMP --box $BOX_CMP --n-classes $K_CMP --json "$OUT/compare.json"
tail -n 1 "$OUT/compare.log" | sed 's/^/  /' >>"$SUMMARY"
rm -f "$OUT/compare.log"  # its JSON is in compare.json

# ---- 4. throughput at box 128, K 200, 20k particles, 6 Å
step speed 240 "$OUT/speed.txt" "$PY" -m companion.cli bench speed --device $DEVICE \
  --n-particles $N_SPEED --box $BOX_SPEED --n-classes $K_SPEED --iters 1 \
  --out /tmp/gpu-check-speed
grep -E "steady state|E-step coarse|coarse GEMM|steady full pass" "$OUT/speed.txt" \
  | sed 's/^/  /' >>"$SUMMARY"

# ---- 5. the cluster bench, where this checkout has it
if "$PY" -m companion.cli bench scale --help 2>/dev/null | grep -q -- "--cluster"; then
  step cluster 150 "$OUT/cluster.txt" "$PY" -m companion.cli bench scale --cluster $CLUSTER \
    --n-particles $N_CLUSTER --n-classes $K_CLUSTER --box $BOX_CLUSTER --device $DEVICE \
    --out /tmp/gpu-check-cluster
  tail -n 8 "$OUT/cluster.txt" | sed 's/^/  /' >>"$SUMMARY"
else
  say "cluster: SKIPPED (companion bench scale has no --cluster in this checkout)"
fi
say "done; results in $OUT"
