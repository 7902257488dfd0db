#!/usr/bin/env bash
# Installs cps-fast on the GPU machine (run_gpu.sh's install and build steps; issue 19).
#
#   bash benchmarks/gpu/install.sh [PREBUILT.so]   # the prebuilt extension, without compiling
#   bash benchmarks/gpu/install.sh --compile       # a real build (nvcc, MAX_JOBS jobs)
#
# The prebuilt file is .prebuilt/cps_fast_C-*-py<this Python>-*.so by default (carried with
# carry=[".prebuilt"]; benchmarks/gpu/build_prebuilt.sh makes it). It is installed only when
# setup.py's own check accepts it here (benchmarks/gpu/check_prebuilt.py: torch exactly the stamped
# version, same Python, csrc/ and flags, checksum, and it imports with CUDA kernels for this GPU);
# the editable install then copies it in place of compiling (CPS_FAST_PREBUILT).
#
# Exit 0: installed, or already installed from this tree with CUDA kernels (a warm machine);
# 3: no prebuilt file, or it cannot stand in here (the reason is printed): the caller compiles;
# 1: pip or the final import failed. Everything pip prints goes to $WORK/install.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}
WORK=${WORK:-/tmp}
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a} CPS_FAST_PORTABLE=${CPS_FAST_PORTABLE:-1}
say() { echo "install: $*"; }

# the installed package is this tree's and its extension has CUDA kernels (imported from /, not from here)
ready() {
  (cd / && ROOT=$ROOT "$PY" -c "
import os, sys
import cps_fast, cps_fast.kernels, cps_fast._C as c
sys.exit(0 if c.has_cuda() and cps_fast.__file__.startswith(os.environ['ROOT'] + os.sep) else 1)" 2>/dev/null)
}
pip_install() {  # the editable install, offline, against the torch already here; $1: its log
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$1" 2>&1 \
    || { tail -40 "$1"; say "pip failed (log: $1)"; return 1; }
  grep "cps-fast: " "$1" | sed 's/^ *//'
}

if [[ ${1:-} == --compile ]]; then
  unset CPS_FAST_PREBUILT
  # only where the GPU is: elsewhere this would rebuild a development checkout's CPU extension
  "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null \
    || { say "refusing to compile: this torch has no CUDA or sees no GPU"; exit 1; }
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  say "compiling cps_fast._C for sm_$CPS_FAST_CUDA_ARCHS ($MAX_JOBS jobs)"
  pip_install "$WORK/build.txt" || exit 1
  ready || { say "the compiled extension has no CUDA kernels (no nvcc? see $WORK/build.txt)"; exit 1; }
  say "compiled and installed"
  exit 0
fi

if ready; then
  say "already installed from $ROOT, with CUDA kernels"
  exit 0
fi
tag=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
so=${1:-$(ls .prebuilt/cps_fast_C-*-py"$tag"-*.so 2>/dev/null | head -1)}
if [[ -z $so ]]; then
  say "no prebuilt extension for Python ${tag:0:1}.${tag:1} in .prebuilt/ (carry=[\".prebuilt\"]; benchmarks/gpu/build_prebuilt.sh)"
  exit 3
fi
"$PY" benchmarks/gpu/check_prebuilt.py "$so" || exit 3
CPS_FAST_PREBUILT=$so pip_install "$WORK/install.txt" || exit 1
ext=cps_fast/_C$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cmp -s "$so" "$ext" || { say "pip did not install $so as $ext (log: $WORK/install.txt)"; exit 1; }
ready || { say "$ext is installed but cps_fast does not import with CUDA kernels from /"; exit 1; }
say "installed $so without compiling"
