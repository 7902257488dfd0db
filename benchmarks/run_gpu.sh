#!/usr/bin/env bash
# The GPU proof on a lent H100/H200 (see ../shared/GPU.md and benchmarks/NOTES.md): build the
# extension for sm_90a, install DALI from the carried wheels (.dali/part-*), run the GPU tests
# and every benchmark with the same-run ceilings, writing JSON and logs to $OUT (the folder the
# device tool brings back; benchmarks/results/<date>-<gpu>/ when $OUT is unset).
#
# One device call runs at most 10 minutes and the machine is given back 30 s after a call, so
# the work is split into steps run in back-to-back calls, each well under the limit:
#
#   STEPS="build tests"          bash benchmarks/run_gpu.sh   # ~5 min: build, GPU tests, CUDA loss tests
#   STEPS="loss upsample ncps"   bash benchmarks/run_gpu.sh   # ~6 min
#   STEPS="model data"           bash benchmarks/run_gpu.sh   # ~5 min
#   STEPS="step"                 bash benchmarks/run_gpu.sh   # ~6 min
#
# "build" is skipped when the extension is already built with CUDA (a warm machine keeps it);
# every step after it builds first if needed. DALI is installed once per machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-"build tests loss upsample ncps model data step"}
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
dir=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-$gpu}
mkdir -p "$dir"
log() { echo "== $(date +%T) $*" | tee -a "$dir/run_gpu.log"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

built() { $PY -c "import cps_fast._C as c, sys; sys.exit(0 if c.has_cuda() else 1)" 2>/dev/null; }
if has build || ! built; then
  log "build (sm_$CPS_FAST_CUDA_ARCHS)"
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$dir/build.txt" 2>&1 \
    || { tail -40 "$dir/build.txt"; exit 1; }
  built || { echo "extension built without CUDA"; exit 1; }
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
$PY - <<'EOF' | tee "$dir/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import nvidia.dali as d; print("dali", d.__version__)
except ImportError:
    print("dali missing")
EOF

if has tests; then
  log "GPU-marked tests"
  timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider -rs 2>&1 | tail -40 | tee "$dir/tests-gpu.txt"
  log "every backend on CUDA tensors (loss, extension)"
  timeout 240 $PY -m pytest -q tests/test_loss.py tests/test_csrc.py -k cuda -p no:cacheprovider 2>&1 \
    | tail -30 | tee "$dir/tests-cuda.txt"
fi
if has loss; then
  log "loss benchmark (+ tile configuration sweep)"
  timeout 200 $PY benchmarks/bench_loss.py --providers eager,triton,cuda --triton-configs 64:8,128:8,256:16 \
    --json "$dir/loss.json" 2>&1 | tee "$dir/loss.txt" | tail -45
  timeout 100 $PY benchmarks/bench_loss.py --providers compile --dtypes bf16 --modes fwd+bwd \
    --json "$dir/loss-compile.json" 2>&1 | tee "$dir/loss-compile.txt" | tail -12
fi
if has upsample; then
  log "upsample-fused loss benchmark"
  timeout 120 $PY benchmarks/bench_upsample.py --json "$dir/upsample.json" 2>&1 | tee "$dir/upsample.txt" | tail -20
fi
if has ncps; then
  log "n-CPS loss benchmark"
  timeout 120 $PY benchmarks/bench_ncps.py --json "$dir/ncps.json" 2>&1 | tee "$dir/ncps.txt" | tail -20
fi
if has model; then
  log "model benchmark (+ matmul ceiling)"
  timeout 150 $PY benchmarks/bench_model.py --json "$dir/model.json" 2>&1 | tee "$dir/model.txt" | tail -20
fi
if has data; then
  log "data benchmark"
  timeout 120 $PY benchmarks/bench_data.py --images 16 --json "$dir/data.json" 2>&1 | tee "$dir/data.txt" | tail -20
fi
if has step; then
  log "step benchmark"
  timeout 330 $PY benchmarks/bench_step.py --images 32 --json "$dir/step.json" 2>&1 | tee "$dir/step.txt" | tail -30
fi
log "done: $dir"
ls -la "$dir"
