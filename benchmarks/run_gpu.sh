#!/usr/bin/env bash
# The GPU proof on a lent H100/H200 (issue 6; ../shared/GPU.md; benchmarks/NOTES.md), in one call:
# build the extension for sm_90a, install DALI from the carried wheels (.dali/part-*), run the
# whole test suite (GPU-marked tests included, in parallel processes), then every benchmark with
# the same-run ceilings, and print issue 6's targets (benchmarks/targets.py) last.
#
#   bash benchmarks/run_gpu.sh                       # everything, inside BUDGET seconds (default 560)
#   STEPS="loss step" bash benchmarks/run_gpu.sh     # some steps (a second call, or a re-measure)
#
# Steps, in this order: build tests loss step tiles upsample ncps model data. A step that cannot get
# its minimum time before the deadline is skipped and named at the end, so one device call
# (10 minutes at most) always returns; run the skipped ones with STEPS in the next call (a warm
# machine keeps the build, DALI, Triton's cache and the earlier steps' results, which the merged
# file includes). Files that come back from $OUT (the device tool returns at most 8):
# run_gpu.log (everything printed) and <date>-<gpu>.json (every benchmark's rows, the steps'
# outcomes, the test summary and the targets). Without $OUT they go to
# benchmarks/results/<date>-<gpu>/.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-560}
PY=${PY:-python3}
STEPS=${STEPS:-"build tests loss step tiles upsample ncps model data"}
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || { echo "no CUDA device"; exit 1; }
day=$(date +%Y-%m-%d)
dir=${OUT:-benchmarks/results/$day-$gpu}
work=/tmp/cps_fast_gpu_run  # each benchmark's JSON and the steps' outcomes; kept across calls on a warm machine
mkdir -p "$dir" "$work"
exec > >(tee -a "$dir/run_gpu.log") 2>&1
TEE=$!

log() { echo "== $(date +%T) [$(( $(date +%s) - START ))s] $*"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
left() { echo $(( START + BUDGET - $(date +%s) )); }
# step NAME MIN MAX CMD...: run CMD under a timeout of at most MAX seconds, if MIN are left;
# the outcome is appended to $work/steps.tsv (a step's last line wins when results are merged)
step() {
  local name=$1 min=$2 max=$3 l t rc outcome
  shift 3
  has "$name" || return 0
  l=$(left)
  if (( l < min )); then
    log "skip $name: ${l}s of the budget left, it needs ${min}s (run it with STEPS=\"$name\")"
    printf '%s\tskipped: %ss of the budget left\t%s\n' "$name" "$l" "$(date +%FT%T)" >> "$work/steps.tsv"
    return 1
  fi
  t=$(( l - 10 < max ? l - 10 : max ))
  log "$name (at most ${t}s)"
  SECONDS=0
  timeout "$t" "$@"
  rc=$?
  case $rc in 0) outcome=ok ;; 124) outcome="timed out after ${t}s" ;; *) outcome="exit $rc" ;; esac
  log "$name: $outcome in ${SECONDS}s"
  printf '%s\t%s in %ss\t%s\n' "$name" "$outcome" "$SECONDS" "$(date +%FT%T)" >> "$work/steps.tsv"
  return $rc
}

built() { $PY -c "import cps_fast._C as c, sys; sys.exit(0 if c.has_cuda() else 1)" 2>/dev/null; }
if has build || ! built; then
  STEPS="$STEPS build" step build 60 300 bash -c "$PY -m pip install -q --no-build-isolation --no-deps -e . \
    > $work/build.txt 2>&1 || { tail -40 $work/build.txt; exit 1; }"
  built || { log "the extension has no CUDA kernels: stopping"; tail -20 "$work/build.txt"; exit 1; }
fi
if ! $PY -c "import nvidia.dali" 2>/dev/null; then
  if ls .dali/part-* >/dev/null 2>&1; then
    log "install DALI from .dali/"
    cat .dali/part-* | tar x -C /tmp \
      && $PY -m pip install -q --no-index --no-deps --target /tmp/site /tmp/dali-wheels/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    log "no DALI: .dali/part-* were not carried; DALI tests and variants are skipped"
  fi
fi
$PY - > "$work/env.txt" <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import nvidia.dali as d; print("dali", d.__version__)
except ImportError:
    print("dali missing")
PYEOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  >> "$work/env.txt" 2>/dev/null
cat "$work/env.txt"

B=benchmarks
# the whole suite, one pytest per file, 8 at a time, sharing the GPU (correctness, not timing) and
# Triton's cache; the GPU image has no pytest-xdist. Files still running at the deadline are
# interrupted and keep what they finished; the merged JUnit report names what did not finish.
# (the deadline leaves the step's timeout 35 s for the interrupted files' reports and the merge)
tests_cap=240
(( $(left) - 10 < tests_cap )) && tests_cap=$(( $(left) - 10 ))
step tests 60 240 $PY $B/run_tests.py --jobs 8 --deadline $(( tests_cap - 35 )) --junit "$work/tests.xml"
# the fused providers first: if torch.compile's builds run the step out of time, the last rows lost are its own
step loss 60 160 $PY $B/bench_loss.py --providers triton,cuda,eager,compile \
  --dtypes bf16 --modes fwd+bwd --json "$work/loss.json"
# the last variant (everything on) is also profiled for 3 iterations: its kernel summary lands in the log and the JSON
step step 90 220 $PY $B/bench_step.py --images 32 --warmup 13 --iters 20 --json "$work/step.json" \
  --trace "$work/traces" --trace-variants +cuda_graph --trace-iters 3
# the loss's tile configurations beside the heuristic (NOTES.md: NCHW's cross-warp reductions, the
# flat channels_last kernel); 16:1, 32:1 and 64:4 keep NCHW's class reductions inside a warp or a few
step tiles 30 150 $PY $B/bench_loss.py --providers triton --triton-configs 64:8,32:1,32:2,64:4,16:1,flat,flat:64:8,flat:32:4,flat:16:1 \
  --dtypes bf16 --modes fwd+bwd --json "$work/loss-tiles.json"
# beside the heuristic (4x8:16:1:0, classes in registers): the lanes-across-classes layout it replaced
# (8x8:32:8:1), and pixel-per-thread blocks with fewer instructions but spills, or more halo (NOTES.md)
step upsample 30 120 $PY $B/bench_upsample.py \
  --providers "fused,unfused,reference,fused[8x8:32:8:1],fused[8x8:128:4:0],fused[4x4:16:1:0]" --json "$work/upsample.json"
# triton[16x1]: one warp per 16-pixel tile, no cross-warp class reductions (0 barriers in NCHW, was 71-113)
step ncps 30 100 $PY $B/bench_ncps.py --shapes voc --providers "eager,triton,triton[e2],triton[e4],triton[16x1]" \
  --json "$work/ncps.json"
step model 40 100 $PY $B/bench_model.py --json "$work/model.json"
step data 30 80 $PY $B/bench_data.py --images 16 --json "$work/data.json"

# one JSON back: every benchmark's rows (this call's and a warm machine's earlier calls'), the
# steps' outcomes, the test summary, and the targets
log "targets"
$PY $B/targets.py "$work" --out "$dir/$day-$gpu.json" --info "steps_asked=$STEPS" --info "budget_s=$BUDGET" \
  --info "seconds=$(( $(date +%s) - START ))"
cut -f1,2 "$work/steps.tsv" | sed 's/^/  /'
log "done in $(( $(date +%s) - START ))s: $dir"
ls -la "$dir"
exec 1>&- 2>&-
wait "$TEE"
