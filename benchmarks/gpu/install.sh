#!/usr/bin/env bash
# Installs cps-fast on the GPU machine (run_gpu.sh's install and build steps; issue 19).
#
#   bash benchmarks/gpu/install.sh [PREBUILT.so]   # the prebuilt extension, without compiling
#   bash benchmarks/gpu/install.sh --compile       # a real build (nvcc, MAX_JOBS jobs)
#   bash benchmarks/gpu/install.sh --ready         # only: is it installed from here with CUDA kernels?
#
# The prebuilt file is .prebuilt/cps_fast_C-*-py<this Python>-*.so by default (carried with
# carry=[".prebuilt"]; benchmarks/gpu/build_prebuilt.sh makes it). It is installed only when
# setup.py's own check accepts it here (benchmarks/gpu/check_prebuilt.py: torch exactly the stamped
# version, same Python, csrc/ and flags, checksum, and it imports with CUDA kernels for this GPU);
# the editable install then copies it in place of compiling (CPS_FAST_PREBUILT), without importing
# it a second time: check_prebuilt.py hands the checksum of the file it probed to setup.py
# (CPS_FAST_PREBUILT_PROBED), whose build skips its own probe while the file still has it. One
# install thus imports torch about 5 times (the check, its probe, pip's three setup.py runs) and
# starts CUDA twice (the probe and the final check), each worth seconds on a fresh machine.
#
# Exit 0: installed, or already installed from this tree with CUDA kernels (a warm machine);
# 3: no prebuilt file, or it cannot stand in here (the reason is printed): the caller compiles;
# 1: pip or the final import failed (--ready: not installed from here). Everything pip prints goes to
# $WORK/install.txt.
set -uo pipefail
cd -P "$(dirname "$0")/../.."
ROOT=$(pwd -P)  # resolved: pip records the path it is given, and a symlink must not make ready() false
PY=${PY:-python3}
WORK=${WORK:-/tmp}
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a} CPS_FAST_PORTABLE=${CPS_FAST_PORTABLE:-1}
say() { echo "install: $*"; }

# the installed package is this tree's and its extension has CUDA kernels (imported from /, not from
# here; both paths resolved); why not, in $WORK/ready.txt
ready() {
  (cd / && ROOT=$ROOT "$PY" -c "
import os, sys
import cps_fast, cps_fast.kernels, cps_fast._C as c
where, root = os.path.realpath(cps_fast.__file__), os.path.realpath(os.environ['ROOT'])
if not where.startswith(root + os.sep):
    sys.exit(f'cps_fast imports from {where}, not from {root}')
if not c.has_cuda():
    sys.exit(f'{c.__file__} has no CUDA kernels')" > "$WORK/ready.txt" 2>&1)
}
pip_install() {  # the editable install, offline, against the torch already here; $1: its log
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$1" 2>&1 \
    || { tail -40 "$1"; say "pip failed (log: $1)"; return 1; }
  grep "cps-fast: " "$1" | sed 's/^ *//'
}

if [[ ${1:-} == --ready ]]; then
  if ready; then say "installed from $ROOT, with CUDA kernels"; exit 0; fi
  say "not ready: $(tail -1 "$WORK/ready.txt")"
  exit 1
fi

if [[ ${1:-} == --compile ]]; then
  unset CPS_FAST_PREBUILT CPS_FAST_PREBUILT_PROBED
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
verdict=$("$PY" benchmarks/gpu/check_prebuilt.py "$so")
rc=$?
echo "$verdict"
(( rc == 0 )) || exit 3
sha=${verdict##*sha256=}
[[ $sha =~ ^[0-9a-f]{64}$ ]] || { say "check_prebuilt.py named no sha256: '$verdict'"; exit 1; }
CPS_FAST_PREBUILT=$so CPS_FAST_PREBUILT_PROBED=$sha pip_install "$WORK/install.txt" || exit 1
ext=cps_fast/_C$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cmp -s "$so" "$ext" || { say "pip did not install $so as $ext (log: $WORK/install.txt)"; exit 1; }
ready || { say "$ext is installed but cps_fast does not import with CUDA kernels from /: $(tail -1 "$WORK/ready.txt")"; exit 1; }
say "installed $so without compiling"
