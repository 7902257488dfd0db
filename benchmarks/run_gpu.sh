#!/usr/bin/env bash
# The GPU proof on a lent H100/H200 in two device calls, inside 14 of a task's 15 device-minutes
# with the machine's start (issue 19; ../shared/GPU.md; benchmarks/NOTES.md "The GPU session").
# The plan (every step's minimum and maximum seconds, the calls' deadlines, the session's
# arithmetic) is benchmarks/gpu/plan.tsv, which tests/test_gpu_plan.py checks. ISSUE=20 runs issue
# 20's session instead (DALI on the GPU, the production path), planned in benchmarks/gpu/plan-20.tsv:
# the same rows and rules, plus what each call carries (`carry` and `size` rows; see that file).
#
#   PLAN=1 bash benchmarks/run_gpu.sh             # the plan: both calls' steps and budgets, the session's
#                                                 # total (any machine: no torch, no GPU; CALL=1|2 for one)
#   bash benchmarks/run_gpu.sh                    # call 1: env, install, -m gpu tests, loss, step, targets
#   CALL=2 bash benchmarks/run_gpu.sh             # call 2 (warm machine): tiles, upsample, ncps, targets
#   STEPS="loss model" bash benchmarks/run_gpu.sh # chosen steps, deadline BUDGET (default: 40 s under the limit)
#
# On the device (the README's "On a GPU"): run(command="bash benchmarks/run_gpu.sh",
# carry=[".prebuilt"], timeout_s=600); as soon as it returns run(command="CALL=2 bash
# benchmarks/run_gpu.sh", carry=[".prebuilt"], timeout_s=600); give_back as soon as that returns
# (the machine stays warm, and billed, 30 s after a call).
#
# Issue 20 (first bash benchmarks/gpu/build_prebuilt.sh and bash benchmarks/gpu/pack_dali.sh here):
#   ISSUE=20 PLAN=1 bash benchmarks/run_gpu.sh    # its plan, with each call's run(...) and carried MiB
#   run(command="ISSUE=20 bash benchmarks/run_gpu.sh", carry=[".dali/dali.tar.xz.1", ".dali/SHA256SUMS",
#       ".prebuilt"], timeout_s=600): env, install, dali (the pack: benchmarks/gpu/install_dali.sh),
#       dali_tests (-m gpu -k dali: tests/test_gpu_dali.py and the dali-gpu cases), dali_step, dali_data
#   at once after it: run(command="ISSUE=20 CALL=2 bash benchmarks/run_gpu.sh", carry=[".prebuilt"],
#       timeout_s=600): env, ncps_k, model_os; then give_back.
#
# Steps, in this order: env install tests loss step | env tiles upsample ncps | model data (STEPS
# only; data is DALI's, issue 20). Issue 20's: env install dali dali_tests dali_step dali_data | env
# ncps_k model_os | cs_step (STEPS only). A failed dali step (the pack not all here, or nvidia.dali
# not importing) stops the call: every step after it needs DALI. A step starts only while its
# minimum is left before the call's deadline (less the finish), and runs at most its maximum (a
# cap: what it does not use goes to the steps after it); one that cannot start is skipped and named
# for STEPS. Only the environment
# check's own words ("torch sees no CUDA device") stop a call, not its timeout; an install that
# timed out is asked once more whether it landed (install.sh --ready). Two repairs run outside the
# plan, only when needed: install in call 2 when the machine is not the warm one, and build
# (compiling on the device) when the prebuilt extension cannot stand in. Each call ends with the targets (benchmarks/targets.py) over every benchmark's
# rows so far (a warm machine keeps the earlier call's in $work). Files for $OUT: run_gpu-callN.log
# (every call's, printed output) and <date>-<gpu>.json (the rows, the steps' outcomes, the test
# summary, the targets); without $OUT they go to benchmarks/results/<date>-<gpu>/.
#
# PLAN=1 walks the same steps without running them, each taking its whole maximum (the worst
# case); ELAPSED=N starts that walk N seconds into the call, to show what a late start skips.
set -uo pipefail
cd -P "$(dirname "$0")/.."  # the physical path (install.sh compares resolved paths too)
ISSUE=${ISSUE:-19}
case $ISSUE in
  19) PLANFILE=${PLANFILE:-benchmarks/gpu/plan.tsv} ;;  # another file: tests/test_gpu_plan.py
  20) PLANFILE=${PLANFILE:-benchmarks/gpu/plan-20.tsv} ;;
  *) echo "run_gpu: ISSUE=$ISSUE: expected 19 (benchmarks/gpu/plan.tsv) or 20 (benchmarks/gpu/plan-20.tsv)" >&2; exit 2 ;;
esac
PLAN=${PLAN:-0}
PY=${PY:-python3}
# each benchmark's JSON, the steps' outcomes, the logs: kept across the calls of a warm machine
# (RUN_DIR: another folder, for tests/test_gpu_plan.py)
export work=${RUN_DIR:-/tmp/cps_fast_gpu_run}
export WORK=$work

# ---------------------------------------------------------------- the plan
declare -A SESSION=() DEADLINE=() COMMAND=() MIN=() MAX=() NOTE=() RMIN=() RMAX=() RNOTE=() SIZE=() CARRY=() CMIB=()
declare -a ORDER=() REPAIRS=()
bad_row() { echo "run_gpu: $PLANFILE line $1: $2" >&2; exit 2; }
n=0
while read -r kind a b c d rest; do
  n=$(( n + 1 ))
  case $kind in
    '' | '#'*) ;;
    session) [[ $b =~ ^[0-9]+$ ]] || bad_row $n "session $a: '$b' is not a number of seconds"
             SESSION[$a]=$b ;;
    call)    [[ $a =~ ^[12]$ && $b =~ ^[0-9]+$ ]] || bad_row $n "expected: call 1|2 DEADLINE COMMAND"
             DEADLINE[$a]=$b; COMMAND[$a]="$c${d:+ $d}${rest:+ $rest}" ;;
    step)    [[ $a =~ ^([12]|-)$ && $c =~ ^[0-9]+$ && $d =~ ^[0-9]+$ ]] || bad_row $n "expected: step 1|2|- NAME MIN MAX NOTE"
             MIN[$a:$b]=$c; MAX[$a:$b]=$d; NOTE[$a:$b]=$rest; ORDER+=("$a:$b") ;;
    repair)  [[ $b =~ ^[0-9]+$ && $c =~ ^[0-9]+$ ]] || bad_row $n "expected: repair NAME MIN MAX NOTE"
             RMIN[$a]=$b; RMAX[$a]=$c; RNOTE[$a]="$d $rest"; REPAIRS+=("$a") ;;
    size)    [[ $a =~ ^(call|tree)$ && $b =~ ^[0-9]+$ ]] || bad_row $n "expected: size call|tree MIB NOTE"
             SIZE[$a]=$b ;;
    carry)   [[ $a =~ ^[12]$ && -n $b && $c =~ ^[0-9]+$ ]] || bad_row $n "expected: carry 1|2 PATH MIB NOTE"
             CARRY[$a]+="${CARRY[$a]:+ }$b"; CMIB[$a:$b]=$c ;;
    *)       bad_row $n "unknown row kind '$kind'" ;;
  esac
done < "$PLANFILE"
for key in device start limit transfer between release finish; do
  [[ -n ${SESSION[$key]:-} ]] || bad_row "-" "no 'session $key' row"
done
if (( ${#CARRY[@]} )); then
  for key in call tree; do [[ -n ${SIZE[$key]:-} ]] || bad_row "-" "carry rows but no 'size $key' row"; done
fi
FINISH=${SESSION[finish]}
steps_of() { local k out=(); for k in "${ORDER[@]}"; do [[ ${k%%:*} == "$1" ]] && out+=("${k#*:}"); done; echo "${out[*]}"; }
# MIN and MAX of a step: this call's row, else the first row of that name, else its repair row
budget() {
  local k
  if [[ -n ${MIN[$CALL:$1]:-} ]]; then echo "${MIN[$CALL:$1]} ${MAX[$CALL:$1]}"; return; fi
  for k in "${ORDER[@]}"; do [[ ${k#*:} == "$1" ]] && { echo "${MIN[$k]} ${MAX[$k]}"; return; }; done
  [[ -n ${RMIN[$1]:-} ]] && { echo "${RMIN[$1]} ${RMAX[$1]}"; return; }
  return 1
}

# ---------------------------------------------------------------- steps under one deadline
CLOCK=0  # PLAN=1: seconds the walk has spent
now() { if (( PLAN )); then echo $(( START + CLOCK )); else date +%s; fi; }
left() { echo $(( START + BUDGET - FINISH - $(now) )); }
log() { if (( PLAN )); then echo "  == [$(( $(now) - START ))s] $*"; else echo "== $(date +%T) [$(( $(now) - START ))s] $*"; fi; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
record() { (( PLAN )) || printf '%s\t%s\t%s\n' "$1" "$2" "$(date +%FT%T)" >> "$work/steps.tsv"; }
# step NAME CMD...: run CMD (a command or one of this file's functions) for at most MAX seconds,
# if MIN are left; STEP_T holds the seconds granted. The outcome goes to $work/steps.tsv.
step() { has "$1" || return 0; run_step step "$@"; }
repair() { run_step repair "$@"; }
run_step() {
  local kind=$1 name=$2 min max l rc outcome
  shift 2
  read -r min max <<< "$(if [[ $kind == repair ]]; then echo "${RMIN[$name]:-} ${RMAX[$name]:-}"; else budget "$name"; fi)"
  [[ $min =~ ^[0-9]+$ ]] || { echo "run_gpu: the $kind '$name' has no row in $PLANFILE" >&2; exit 2; }
  l=$(left)
  if (( l < min )); then
    log "skip $name: ${l}s left before the deadline, it needs ${min}s (run it with STEPS=\"$name\")"
    record "$name" "skipped: ${l}s left, needs ${min}s"
    return 1
  fi
  export STEP_T=$(( l < max ? l : max ))
  if (( PLAN )); then
    printf '  %-10s %-6s %4s %4s %5s  %s\n' "$name" "$kind" "$min" "$max" "$STEP_T" \
      "$(if [[ $kind == repair ]]; then echo "${RNOTE[$name]}"; else echo "${NOTE[$CALL:$name]:-}"; fi)"
    CLOCK=$(( CLOCK + STEP_T ))
    return 0
  fi
  log "$name (at most ${STEP_T}s)"
  SECONDS=0
  if declare -F "$1" > /dev/null; then
    timeout -k 5 "$STEP_T" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")"
  else
    timeout -k 5 "$STEP_T" "$@"
  fi
  rc=$?
  case $rc in 0) outcome=ok ;; 124 | 137) outcome="timed out after ${STEP_T}s" ;; *) outcome="exit $rc" ;; esac
  log "$name: $outcome in ${SECONDS}s"
  record "$name" "$outcome in ${SECONDS}s"
  return $rc
}

# ---------------------------------------------------------------- what the steps run
B=benchmarks
env_check() {  # the first seconds: is everything a step needs there? (exit 4 when torch sees no GPU)
  set -o pipefail
  rm -f "$work/env.txt" "$work/extension.txt"  # an earlier call's must not stand in for this one's
  {
    echo "which ninja gcc: $(which ninja gcc 2>/dev/null | tr '\n' ' ')(nvcc: $(command -v nvcc || echo missing))"
    ldconfig -p | grep -E 'libcuda\.so|libgomp\.so' || echo "libcuda, libgomp: not in ldconfig -p"
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
      --format=csv 2>&1
    free -m | head -2
    "$PY" - <<'PYEOF'
import os, sys, sysconfig
h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("python", sys.version.split()[0], "Python.h:", h if os.path.exists(h) else f"MISSING ({h})")
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if not torch.cuda.is_available():  # run_call stops on exactly this line (a timeout does not stop it)
    print(f"torch sees no CUDA device (torch.cuda.is_available() is False; torch built for CUDA "
          f"{torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    sys.exit(4)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
free, total = torch.cuda.mem_get_info()
print(f"gpu memory: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
try:
    import nvidia.dali as d
    print("dali", d.__version__)
except ImportError:
    print("dali missing")
root = os.path.realpath(os.getcwd())
os.chdir("/")  # the installed package, not this folder's
sys.path[:] = [p for p in sys.path if p not in ("", root, os.environ.get("PWD"))]
try:
    import cps_fast, cps_fast.kernels, cps_fast._C as c
    # both sides resolved: pip records the path it was given, which may run through a symlink
    mine = os.path.realpath(cps_fast.__file__).startswith(root + os.sep)
    state = "ready" if c.has_cuda() and mine else "no CUDA kernels or not this tree"
except Exception as exc:  # not installed yet (call 1), or broken: the install step decides
    state = f"not installed ({type(exc).__name__}: {exc})"
print("cps_fast._C:", state)
open(os.path.join(os.environ["work"], "extension.txt"), "w").write(state + "\n")
PYEOF
  } 2>&1 | tee "$work/env.txt"
}
gpu_tests() {  # the gpu-marked tests, one pytest per core of the 16, interrupted 25 s before the cap:
  # 20 s for the interrupted ones to write their reports, 5 s to merge them
  "$PY" benchmarks/run_tests.py --jobs 16 --deadline $(( STEP_T - 25 )) --grace 20 --junit "$work/tests.xml" -- -m gpu
}
# issue 20's DALI pack (.dali/, benchmarks/gpu/pack_dali.sh): checksums, unpacked into $DALI_SITE
# (first on PYTHONPATH for every step), checked with the mixed decoder and DALI's GPU operators
dali_install() {
  CHECK_ARGS="--gpu yes --json $work/dali_pack.json" bash benchmarks/gpu/install_dali.sh
}
# the gpu-marked DALI tests: tests/test_gpu_dali.py (-k matches its module name) and the dali-gpu
# cases of the other files, one pytest per file as the tests step
dali_tests() {
  [[ -f tests/test_gpu_dali.py ]] || { echo "tests/test_gpu_dali.py is missing: the production-path tests are not in this tree"; return 1; }
  # CPS_FAST_REQUIRE_DALI=1: test_gpu_dali.py's tests fail, not skip, where DALI does not import
  CPS_FAST_REQUIRE_DALI=1 "$PY" benchmarks/run_tests.py --jobs 16 --deadline $(( STEP_T - 25 )) --grace 20 \
    --junit "$work/tests.xml" -- -m gpu -k dali
}
# DeepLabv3+ forward + backward, R50 and R101, at output stride 16 and then 8 (one run each)
model_os() {
  for os in 16 8; do
    "$PY" benchmarks/bench_model.py --device cuda --backbones resnet50,resnet101 --modes cl-bf16 \
      --shapes 8x3x512x512 --output-stride $os --json "$work/model-os$os.json" || return
  done
}
# install.sh's exit status $1 as the call takes it: a timeout is not the last word when the install
# itself landed (pip done, the last check cut off), so ask once more, outside the step's cap
installed() {
  local rc=$1
  (( PLAN )) && return 0
  if (( rc == 124 || rc == 137 )); then
    log "the install timed out: is cps_fast installed with CUDA kernels anyway? (install.sh --ready, at most 30 s)"
    if timeout -k 5 30 bash $B/gpu/install.sh --ready; then
      record install-ready "installed after all (install.sh --ready)"
      return 0
    fi
  fi
  return "$rc"
}

run_call() {
  # the installed extension: the prebuilt one (call 1), again only if call 2 finds none; a
  # compile only where the prebuilt cannot stand in
  local rc=0
  step env env_check
  rc=$?
  # only what the check printed stops the call: a timeout (a fresh machine's first cold import torch)
  # or another failure leaves the install and the tests to decide
  if (( ! PLAN )) && has env && grep -q '^torch sees no CUDA device' "$work/env.txt" 2> /dev/null; then
    log "torch sees no CUDA device ($work/env.txt): stopping"
    return 1
  fi
  (( rc == 0 )) || log "the environment check did not finish (exit $rc; $work/env.txt has what it saw): going on"
  rc=0
  if has install; then
    step install bash $B/gpu/install.sh
    installed $?
    rc=$?
  elif (( ! PLAN )) && [[ " $STEPS " != " env " ]] && [[ $(cat "$work/extension.txt" 2>/dev/null) != ready ]]; then
    repair install bash $B/gpu/install.sh
    installed $?
    rc=$?
  fi
  if (( rc == 3 )); then
    repair build bash $B/gpu/install.sh --compile
    rc=$?
  fi
  if (( rc != 0 )); then
    log "no cps_fast._C with CUDA kernels: stopping (the outcomes above say why)"
    return 1
  fi
  if has dali; then  # issue 20: every step after it needs DALI
    step dali dali_install
    rc=$?
    if (( rc == 2 )); then
      log "DALI imports, but a check failed ($work/dali_pack.json): going on, the tests say more"
    elif (( rc != 0 )); then
      log "no DALI from the pack (install_dali.sh exit $rc, above): stopping"
      return 1
    fi
  elif (( ! PLAN )) && has data && ! "$PY" -c "import nvidia.dali" 2> /dev/null && [[ -f .dali/SHA256SUMS ]]; then
    log "install DALI from .dali/ (issue 20's pack)"  # outside the plan, as the data step itself
    bash $B/gpu/install_dali.sh
  fi

  step tests gpu_tests
  # providers are the outer loop, in this order, over both shapes: every triton, cuda and eager row is
  # in before torch.compile's first build, so a step cut off at its cap loses compile rows only
  step loss $PY $B/bench_loss.py --providers triton,cuda,eager,compile \
    --dtypes bf16 --modes fwd+bwd --json "$work/loss.json"
  # no DALI (issue 20), the PyTorch loader. Run in the order given: the baseline, then the headline
  # +cuda_graph (the >= 4x row, profiled for 3 iterations: its kernel summary lands in the log and the
  # JSON), then the ladder's steps between them; each variant's row, the ratios and the schedule
  # hours are written as soon as it is measured
  step step $PY $B/bench_step.py --variants reference,+cuda_graph,+channels_last,+bf16,+fused_loss,+fused_upsample \
    --images 32 --warmup 13 --iters 20 --json "$work/step.json" \
    --trace "$work/traces" --trace-variants +cuda_graph --trace-iters 3
  # the loss's tile configurations beside the heuristic (NOTES.md: NCHW's cross-warp reductions, the
  # flat channels_last kernel); 16:1, 32:1 and 64:4 keep NCHW's class reductions inside a warp or a few
  step tiles $PY $B/bench_loss.py --providers triton --triton-configs 64:8,32:1,32:2,64:4,16:1,flat,flat:64:8,flat:32:4,flat:16:1 \
    --dtypes bf16 --modes fwd+bwd --json "$work/loss-tiles.json"
  # beside the heuristic (4x8:16:1:0, classes in registers): the lanes-across-classes layout it replaced
  # (8x8:32:8:1), and pixel-per-thread blocks with fewer instructions but spills, or more halo (NOTES.md)
  step upsample $PY $B/bench_upsample.py \
    --providers "fused,unfused,reference,fused[8x8:32:8:1],fused[8x8:128:4:0],fused[4x4:16:1:0]" --json "$work/upsample.json"
  # K = 3 (the n-CPS setting); triton[16x1]: one warp per 16-pixel tile, no cross-warp class reductions
  step ncps $PY $B/bench_ncps.py --shapes voc --ks 3 --providers "eager,triton,triton[e2],triton[e4],triton[16x1]" \
    --json "$work/ncps.json"
  # issue 20: K = 2, 3, 4 against the same-run copy bandwidth (its rows' copy_fraction)
  step ncps_k $PY $B/bench_ncps.py --shapes voc,cityscapes --ks 2,3,4 --providers triton,eager \
    --json "$work/ncps-k.json"
  step model $PY $B/bench_model.py --json "$work/model.json"
  step model_os model_os
  step data $PY $B/bench_data.py --images 16 --json "$work/data.json"
  step dali_tests dali_tests
  # the step DALI feeds: +cuda_graph is the ladder's top (dali-gpu, bf16, channels_last, fused loss and
  # upsample, the graph); data_ms against one held batch, and the images/s dali_data must double
  step dali_step $PY $B/bench_step.py --variants +cuda_graph --images 32 --warmup 13 --iters 20 \
    --json "$work/step.json"
  step dali_data $PY $B/bench_data.py --backends dali-gpu --settings voc cityscapes --images 32 --iters 30 \
    --json "$work/data.json"
  step cs_step $PY $B/bench_step.py --preset cityscapes_r50_1-8_cutmix --variants +cuda_graph --images 8 \
    --warmup 13 --iters 20 --json "$work/step-cityscapes.json"
}

# ---------------------------------------------------------------- PLAN=1: the walk and the arithmetic
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# a plan with carry rows (issue 20's): call $1's run(...), its carry caps against the tool's limit,
# and the sizes here (the working tree by git, the carried paths by du where they are made already)
carried() {
  local call=$1 p list="" caps=${SIZE[tree]} parts="" tree have missing=""
  for p in ${CARRY[$call]:-}; do
    list+="${list:+, }\"$p\""; caps=$(( caps + CMIB[$call:$p] )); parts+=" + $p ${CMIB[$call:$p]}"
  done
  echo "  run(command=\"${COMMAND[$call]}\", carry=[$list], timeout_s=${SESSION[limit]})"
  echo "  carries at most ${caps} MiB of the ${SIZE[call]} MiB a call may: the working tree ${SIZE[tree]}$parts"
  (( caps <= SIZE[call] )) || { echo "run_gpu: call $call carries up to ${caps} MiB, over ${SIZE[call]} MiB" >&2; return 1; }
  tree=$(git ls-files -co --exclude-standard -z 2> /dev/null | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1) || return 0
  [[ $tree =~ ^[0-9]+$ ]] || return 0
  have=$tree
  for p in ${CARRY[$call]:-}; do
    if [[ -e $p ]]; then have=$(( have + $(du -sb "$p" | cut -f1) )); else missing+=" $p"; fi
  done
  echo "  here: the working tree $(mib "$tree"), with the carried paths $(mib "$have")${missing:+ (not made yet:$missing)}"
  (( tree <= SIZE[tree] * 1048576 )) \
    || { echo "run_gpu: the working tree is $(mib "$tree"), over its ${SIZE[tree]} MiB in $PLANFILE" >&2; return 1; }
  (( have <= SIZE[call] * 1048576 )) \
    || { echo "run_gpu: call $call would carry $(mib "$have"), over ${SIZE[call]} MiB" >&2; return 1; }
}
if (( PLAN )); then
  calls=${CALL:-1 2} asked=${STEPS:-}
  START=0
  for CALL in $calls; do
    [[ -n ${DEADLINE[$CALL]:-} ]] || { echo "run_gpu: CALL=$CALL: expected 1 or 2" >&2; exit 2; }
    STEPS=${asked:-$(steps_of "$CALL")} BUDGET=${DEADLINE[$CALL]} CLOCK=${ELAPSED:-0}
    echo "call $CALL: ${COMMAND[$CALL]}  (deadline ${BUDGET}s of the ${SESSION[limit]}s a command may run)"
    if (( ${#CARRY[@]} )); then carried "$CALL" || exit 1; fi
    printf '  %-10s %-6s %4s %4s %5s  %s\n' name kind min max gets what
    run_call
    printf '  %-10s %-6s %4s %4s %5s  %s\n' finish "" "" "" "$FINISH" "the targets, the steps' outcomes, the files for \$OUT"
    caps=0; for k in $STEPS; do read -r _ hi <<< "$(budget "$k")"; caps=$(( caps + hi )); done
    echo "  worst case $(( CLOCK + FINISH ))s of the ${BUDGET}s deadline (the caps and the finish add up to" \
      "$(( caps + FINISH ))s: a step gets what is left, at most its cap)"
  done
  if [[ $calls == "1 2" ]]; then
    c1=$(( DEADLINE[1] + SESSION[transfer] )) c2=$(( DEADLINE[2] + SESSION[transfer] ))
    total=$(( SESSION[start] + c1 + SESSION[between] + c2 + SESSION[release] ))
    echo "session: start ${SESSION[start]}s + call 1 ${c1}s (with transfers) + between ${SESSION[between]}s" \
      "+ call 2 ${c2}s + warm until give_back ${SESSION[release]}s = ${total}s of ${SESSION[device]}s device time"
    echo "  give_back is the first call after call 2 returns: the machine otherwise stays warm (billed)" \
      "${SESSION[release]}s; what an earlier give_back saves is margin"
    for r in "${REPAIRS[@]}"; do echo "  only when needed: $r ${RMIN[$r]}-${RMAX[$r]}s: ${RNOTE[$r]}"; done
    echo "  with STEPS=\"...\" only: $(steps_of -)"
    (( total <= SESSION[device] )) || { echo "run_gpu: the plan is ${total}s, over ${SESSION[device]}s" >&2; exit 1; }
  fi
  exit 0
fi

# ---------------------------------------------------------------- a device call
START=$(date +%s)
if [[ -n ${STEPS:-} ]]; then
  CALL=${CALL:-steps}
  BUDGET=${BUDGET:-$(( SESSION[limit] - 40 ))}
else
  CALL=${CALL:-1}
  [[ -n ${DEADLINE[$CALL]:-} ]] || { echo "run_gpu: CALL=$CALL: expected 1 or 2" >&2; exit 2; }
  STEPS=$(steps_of "$CALL")
  BUDGET=${BUDGET:-${DEADLINE[$CALL]}}
fi
export CPS_FAST_CUDA_ARCHS=${CPS_FAST_CUDA_ARCHS:-90a} CPS_FAST_PORTABLE=${CPS_FAST_PORTABLE:-1}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PY
# the DALI pack's folder (install_dali.sh unpacks it there; the device README's wheels go there too),
# first on the path of every step, also before it exists
export DALI_SITE=${DALI_SITE:-/tmp/site}
export PYTHONPATH=$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1 | tr ' ' '-')
[[ -n $gpu ]] || { echo "run_gpu: no CUDA device (nvidia-smi lists none)"; exit 1; }
day=$(date +%Y-%m-%d)
dir=${OUT:-benchmarks/results/$day-$gpu}
mkdir -p "$dir" "$work"
exec > >(tee -a "$dir/run_gpu-call$CALL.log" "$work/run_gpu-call$CALL.log") 2>&1
TEE=$!
log "call $CALL on $gpu: steps $STEPS; deadline ${BUDGET}s"

run_call
status=$?

# one JSON back: every benchmark's rows (this call's and a warm machine's earlier calls'), the
# steps' outcomes, the test summary and the targets
log "targets"
$PY $B/targets.py "$work" --out "$dir/$day-$gpu.json" --info "call=$CALL" --info "steps_asked=$STEPS" \
  --info "deadline_s=$BUDGET" --info "seconds=$(( $(date +%s) - START ))"
cut -f1,2 "$work/steps.tsv" 2> /dev/null | sed 's/^/  /'
cp -n "$work"/run_gpu-call*.log "$dir"/ 2> /dev/null  # the earlier calls' logs too
log "done in $(( $(date +%s) - START ))s: $dir"
ls -la "$dir"
exec 1>&- 2>&-
wait "$TEE"
exit $status
