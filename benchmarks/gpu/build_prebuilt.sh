#!/usr/bin/env bash
# Prebuilds cps_fast._C for the GPU machine (issue 19; ../shared/GPU.md), so that no device time goes
# to compiling: torch 2.11.0+cu130 on Python 3.12, kernels for sm_90a only, no -march=native (the
# device's CPU may lack the build machine's vector units), debug info stripped (~2 MB).
#
#   bash benchmarks/gpu/build_prebuilt.sh          # ~7 min on 2 cores the first time; then seconds
#
# Writes .prebuilt/cps_fast_C-torch<ver>-py312-sm<archs>.so and its stamp .json beside it (ignored
# by git; carried to the device with carry=[".prebuilt"]). The stamp holds what setup.py checks
# before it installs the file instead of compiling (CPS_FAST_PREBUILT=<the .so>): torch's version
# and commit, CUDA, Python and its extension suffix, the archs, the portable flag, the hash of csrc/,
# the exact compiler flags, and the file's sha256. Run it again after any change to csrc/ or to
# setup.py's flags: with an up-to-date stamp it only says so; otherwise ninja recompiles what
# changed (its objects stay in BUILD_DIR).
#
# It never touches the checkout's own build: it compiles a copy of setup.py and csrc/ in BUILD_DIR,
# with a throwaway venv OUTSIDE the repository (a CUDA torch must never reach the main environment
# or CI). Settings (environment):
#   VENV=/work/venv-gpu312       the Python 3.12 venv (created, torch installed from PyPI, if missing)
#   PY312=python3.12             the interpreter that creates it (default: python3.12 in PATH, else pyenv's 3.12)
#   TORCH_VERSION=2.11.0+cu130   the device's torch, exactly (PyPI's default 2.11.0 wheel is this build)
#   CPS_FAST_CUDA_ARCHS=90a      CUDA targets
#   CUDA_HOME                    the toolkit (default /usr/local/cuda-<torch's CUDA>, else /usr/local/cuda);
#                                its nvcc must be torch's CUDA release
#   BUILD_DIR=/tmp/cps_fast_prebuilt_build   the copy and ninja's objects
#   JOBS=2                       compile jobs (run with nice: other people share the cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${VENV:-/work/venv-gpu312}
TORCH_VERSION=${TORCH_VERSION:-2.11.0+cu130}
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a} CPS_FAST_PORTABLE=1
unset CPS_FAST_SKIP_CUDA_BUILD CPS_FAST_PREBUILT
BUILD_DIR=${BUILD_DIR:-${TMPDIR:-/tmp}/cps_fast_prebuilt_build}
JOBS=${JOBS:-2}
say() { echo "build_prebuilt: $*"; }
die() { echo "build_prebuilt: $*" >&2; exit 1; }

# 1. the venv with the device's torch
PY=$VENV/bin/python
have=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ $have != "$TORCH_VERSION" ]]; then
  if [[ ! -x $PY ]]; then
    PY312=${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
    [[ -x $PY312 ]] || die "no Python 3.12 to create $VENV (set PY312)"
    say "creating $VENV with $PY312"
    "$PY312" -m venv "$VENV"
  fi
  say "installing torch==${TORCH_VERSION%%+*} (PyPI's default wheel; about 4.5 GB with its CUDA libraries) into $VENV"
  "$PY" -m pip install -q "torch==${TORCH_VERSION%%+*}" numpy ninja "setuptools>=64,<82" wheel
  have=$("$PY" -c "import torch; print(torch.__version__)")
  [[ $have == "$TORCH_VERSION" ]] || die "PyPI's torch==${TORCH_VERSION%%+*} is $have, not $TORCH_VERSION"
fi
cuda=$("$PY" -c "import torch; print(torch.version.cuda)" 2>/dev/null)
[[ $cuda != None ]] || die "$VENV's torch $have has no CUDA"

# 2. the toolkit of torch's CUDA release
if [[ -z ${CUDA_HOME:-} ]]; then
  CUDA_HOME=/usr/local/cuda-$cuda
  [[ -x $CUDA_HOME/bin/nvcc ]] || CUDA_HOME=/usr/local/cuda
fi
export CUDA_HOME
[[ -x $CUDA_HOME/bin/nvcc ]] || die "no nvcc in CUDA_HOME=$CUDA_HOME/bin"
nvcc_release=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[[ $nvcc_release == "$cuda" ]] || die "$CUDA_HOME/bin/nvcc is CUDA $nvcc_release, torch $have needs $cuda"

# 3. what setup.py (the checkout's) will require of the stamp on the device
identity=$(cd "$ROOT" && "$PY" - <<'PYEOF'
import importlib.util, json, os, torch
spec = importlib.util.spec_from_file_location("cps_fast_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)  # defines the functions; setup() runs only as __main__
os.chdir(setup.ROOT)
print(json.dumps(setup._identity(torch, setup._recipe(torch))))
PYEOF
)
archs_tag=${CPS_FAST_CUDA_ARCHS//[;,]/_}
out=$ROOT/.prebuilt/cps_fast_C-torch$have-py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-sm$archs_tag.so
stamp=${out%.so}.json
# up to date when setup.py's own check accepts it here (stamp, checksum, import, CUDA kernels)
if [[ -f $stamp ]] && "$PY" "$ROOT/benchmarks/gpu/check_prebuilt.py" "$out" 2>/dev/null; then
  say "up to date: $out ($(du -h "$out" | cut -f1)); stamp $stamp"
  exit 0
fi

# 4. compile a copy of the sources (ninja keeps the objects in BUILD_DIR for the next run)
mkdir -p "$BUILD_DIR/src" "$ROOT/.prebuilt"
rm -rf "$BUILD_DIR/src/csrc"
cp -a "$ROOT/csrc" "$BUILD_DIR/src/csrc"  # -a keeps the mtimes ninja compares
cp "$ROOT/setup.py" "$BUILD_DIR/src/setup.py"
say "compiling for sm_$CPS_FAST_CUDA_ARCHS against torch $have (CUDA_HOME=$CUDA_HOME, $JOBS jobs, log: $BUILD_DIR/build.log)"
SECONDS=0
( cd "$BUILD_DIR/src" && MAX_JOBS=$JOBS nice -n 10 "$PY" setup.py build_ext --build-lib "$BUILD_DIR/lib" \
    --build-temp "$BUILD_DIR/tmp" ) > "$BUILD_DIR/build.log" 2>&1 || { tail -30 "$BUILD_DIR/build.log"; die "the build failed"; }
built=$(ls "$BUILD_DIR"/lib/cps_fast/_C*.so)
say "compiled in ${SECONDS}s"

# 5. strip the debug info (the kernels' -lineinfo lives in the fatbinary and stays), write the stamp last
strip --strip-debug -o "$out.tmp" "$built"
mv "$out.tmp" "$out"
IDENTITY=$identity NVCC=$nvcc_release "$PY" - "$out" "$stamp" <<'PYEOF'
import datetime, hashlib, json, os, platform, sys
so, stamp = sys.argv[1:]
data = json.loads(os.environ["IDENTITY"])
data.update(sha256=hashlib.sha256(open(so, "rb").read()).hexdigest(), bytes=os.path.getsize(so),
            nvcc=os.environ["NVCC"], stripped=True, built_on=platform.node(),
            built_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
with open(stamp + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
os.replace(stamp + ".tmp", stamp)
PYEOF

# 6. what can be checked without a GPU: it loads beside this torch, has the CUDA kernels, and every
# library it needs resolves (libtorch, libc10_cuda, libcudart from the venv's wheels)
"$PY" -c "
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location('cps_fast._C', sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
assert m.has_cuda(), 'the prebuilt extension has no CUDA kernels'
print('build_prebuilt: imports beside torch', torch.__version__, '; has_cuda() =', m.has_cuda())
" "$out"
# the device code: one cubin per arch and no PTX (nothing for the driver to JIT); cuobjdump comes
# with the full toolkit, or with triton's wheel where the toolkit has only the compiler
cuobjdump=$(command -v "$CUDA_HOME/bin/cuobjdump" || ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)
if [[ -n $cuobjdump ]]; then
  say "device code: $("$cuobjdump" --list-elf "$out" | sed 's/.*: //' | tr '\n' ' '); PTX: $("$cuobjdump" --list-ptx "$out" 2>/dev/null | grep -c ptx) files"
fi
say "arch tags in the fatbinary: $(strings "$out" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')"
say "links against: $(readelf -d "$out" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
say "wrote $out ($(du -h "$out" | cut -f1)) and $stamp"
