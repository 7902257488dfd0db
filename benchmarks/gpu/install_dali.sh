#!/usr/bin/env bash
# Installs the DALI pack (benchmarks/gpu/pack_dali.sh) where it was carried: run_gpu.sh's `dali`
# step on the GPU machine (issue 20), or by hand. No network and no pip: it checks the parts
# against .dali/SHA256SUMS, unpacks them into DALI_SITE (default /tmp/site, which run_gpu.sh puts
# first on PYTHONPATH) and runs benchmarks/gpu/check_dali_pack.py there (import nvidia.dali; a
# JPEG and PNGs decoded on the CPU, and with the mixed decoder and DALI's GPU operators when torch
# sees a GPU).
#
#   bash benchmarks/gpu/install_dali.sh                 # unpack (once per pack) and check
#   DALI_SITE=/tmp/dali312 PY=/tmp/venv/bin/python bash benchmarks/gpu/install_dali.sh
#
# Settings: DALI_SITE, DALI_PACK (the parts' folder, default .dali), PY (python3), CHECK_ARGS
# (passed to check_dali_pack.py, e.g. "--gpu yes --json $work/dali_pack.json"), WORK (for logs).
# Then use it with: export PYTHONPATH=$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}
#
# Exit 0: unpacked (or already, the same pack) and every check passed; 3: the pack is not all
# here (a part missing: each call carries its own, and a machine that went back lost the earlier
# ones) or a checksum is wrong: nothing unpacked; 1: unpacking failed, or nvidia.dali does not
# import from DALI_SITE; 2: it imports, but a decoding or GPU-operator check failed (printed).
set -uo pipefail
cd -P "$(dirname "$0")/../.."
PY=${PY:-python3}
SITE=${DALI_SITE:-/tmp/site}
PACK=${DALI_PACK:-.dali}
say() { echo "install_dali: $*"; }

sums=$PACK/SHA256SUMS
if [[ ! -f $sums ]]; then
  say "no $sums: carry it with the parts (carry=[\"$PACK/dali.tar.xz.1\", \"$sums\", ...]; benchmarks/gpu/pack_dali.sh makes them)"
  exit 3
fi
stamp=$SITE/.cps_fast_dali_installed
want=$(sha256sum < "$sums" | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  say "this pack is unpacked in $SITE already"
else
  mapfile -t parts < <(awk '{ print $2 }' "$sums")
  (( ${#parts[@]} )) || { say "$sums names no part"; exit 3; }
  for p in "${parts[@]}"; do
    if [[ ! -f $PACK/$p ]]; then
      say "$PACK/$p is missing (of ${parts[*]}): each device call carries its own part, and a part carried" \
        "by an earlier call is gone when the machine went back in between (30 s idle); nothing unpacked"
      exit 3
    fi
  done
  if ! (cd "$PACK" && sha256sum --strict --quiet -c SHA256SUMS); then
    say "a part's checksum is not the one $sums names (an interrupted carry?): nothing unpacked"
    exit 3
  fi
  mkdir -p "$SITE" || exit 1
  rm -f "$stamp"
  SECONDS=0
  if command -v xz > /dev/null; then
    (cd "$PACK" && cat "${parts[@]}") | xz -dc -T0 | tar -x -C "$SITE" --no-same-owner
    rc=$?
  else  # Python's lzma and tarfile: the same archive (xz with the x86 filter)
    (cd "$PACK" && cat "${parts[@]}") | "$PY" -c "
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz') as t:
    t.extractall(sys.argv[1], filter='fully_trusted')" "$SITE"
    rc=$?
  fi
  (( rc == 0 )) || { say "unpacking into $SITE failed (exit $rc)"; exit 1; }
  echo "$want" > "$stamp"
  say "unpacked ${parts[*]} into $SITE in ${SECONDS}s ($(du -sh "$SITE" | cut -f1) there)"
fi

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# shellcheck disable=SC2086  # CHECK_ARGS is a list of words
"$PY" benchmarks/gpu/check_dali_pack.py --site "$SITE" ${CHECK_ARGS:-}
rc=$?
case $rc in
  0) say "nvidia.dali imports from $SITE and decodes (export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH})" ;;
  2) say "nvidia.dali imports from $SITE, but a check failed (above)" ;;
  *) say "nvidia.dali does not import from $SITE (above)"; rc=1 ;;
esac
exit $rc
