#!/usr/bin/env bash
# One run on a fresh GPU machine with the project copied in (see ../shared/GPU.md):
# build the extension, install DALI from carried wheels (.dali/part-*), run the whole test
# suite including the GPU tests, every benchmark and the same-run ceilings, and write
# benchmarks/results/<date>-<gpu>/*.json plus a summary table. Budget: under 10 minutes.
#
#   bash benchmarks/run_gpu.sh            # everything
#   STEPS="loss step" bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-"build tests loss model data step"}
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
dir=benchmarks/results/$(date +%Y-%m-%d)-$gpu
mkdir -p "$dir"
log() { echo "== $(date +%T) $*"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has build; then
  log build
  python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  python -c "import cps_fast._C as c; assert c.has_cuda(), 'extension built without CUDA'"
  if ls .dali/part-* >/dev/null 2>&1 && ! python -c "import nvidia.dali" 2>/dev/null; then
    log "install DALI from .dali/"
    cat .dali/part-* | tar x -C /tmp
    python -m pip install -q --no-index --no-deps --target /tmp/site /tmp/dali-wheels/*.whl
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}

if has tests; then
  log "tests (GPU tests first)"
  timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25 | tee "$dir/tests-gpu.txt"
  timeout 150 python -m pytest -q -m "not gpu" tests -x -p no:cacheprovider \
      --deselect tests/test_train.py::test_torchrun_two_processes_gloo 2>&1 | tail -5 | tee "$dir/tests-rest.txt"
fi
if has loss; then
  log "loss benchmark"
  timeout 150 python benchmarks/bench_loss.py --providers eager,triton,cuda --json "$dir/loss.json"
  timeout 120 python benchmarks/bench_loss.py --providers compile --dtypes bf16 --modes fwd+bwd --json "$dir/loss-compile.json"
fi
if has model; then
  log "model benchmark"
  timeout 120 python benchmarks/bench_model.py --json "$dir/model.json"
fi
if has data; then
  log "data benchmark"
  timeout 90 python benchmarks/bench_data.py --json "$dir/data.json"
fi
if has step; then
  log "step benchmark"
  timeout 200 python benchmarks/bench_step.py --json "$dir/step.json"
fi
log "done: $dir"
ls -la "$dir"
