#!/usr/bin/env bash
# The DALI pack for the GPU machine (issue 20): DALI 2.4 for CUDA 13 / Python 3.12 with what it
# loads to decode JPEG and PNG on an H100/H200, and nothing else, xz-compressed into parts that
# fit the device calls of benchmarks/gpu/plan-20.tsv (its `carry` rows; 64 MiB a call in all).
#
#   bash benchmarks/gpu/pack_dali.sh      # about 10 CPU-minutes on 2 cores (xz -9); the download is cached
#
# Writes .dali/dali.tar.xz.1 (and .2 ... only if the plan has rows for them) and .dali/SHA256SUMS
# (ignored by git; carried with carry=[".dali/dali.tar.xz.1", ".dali/SHA256SUMS", ...]); on the
# device benchmarks/gpu/install_dali.sh checks, unpacks and tests them (no network, no pip).
# Prints the sizes: raw, packed, each part, and each call's carried total with the working tree.
#
# What the pack holds, and why the rest is left out (each checked on the wheels of these versions:
# `readelf -d` for what a library needs, the library names in DALI's and nvImageCodec's binaries for
# what they dlopen, sys.modules after `import nvidia.dali` and a decoding pipeline):
#   nvidia/dali          the Python package and libdali*.so, backend_impl and python_function_plugin
#                        (loaded by `import nvidia.dali`) for CPython 3.12 only, and .libs/: every
#                        library there that some kept library NEEDs (ffmpeg, sndfile, cfitsio, the
#                        AWS and Google Cloud SDKs, CV-CUDA are all NEEDED by libdali*.so: they load
#                        at import whether used or not). Left out: include/ (C++ headers for building
#                        DALI plugins), the backend_impl and python_function_plugin builds for other
#                        Pythons (3.10, 3.11, 3.13, 3.14, 3.15), and .libs files no kept library NEEDs
#                        (two duplicate AWS sonames, libaws-c-common.so.1.0.0 and libaws-c-s3.so.1.0.0).
#   nvidia/nvimgcodec    libnvimgcodec.so.0 (DALI's image decoders dlopen it, RUNPATH $ORIGIN/../nvimgcodec)
#                        and three of its extensions, which it loads from extensions/: nvjpeg (JPEG on
#                        the GPU, the mixed decoder), jpeg_turbo (JPEG on the CPU: dali-cpu, and the
#                        mixed decoder's fallback), opencv (PNG, decoded on the CPU for both backends:
#                        nvImageCodec has no GPU PNG decoder). Left out: the nvjpeg2k, nvtiff, tiff,
#                        bmp and pnm extensions (JPEG 2000, TIFF, BMP, PNM: no dataset here has them),
#                        nvImageCodec's own Python bindings (nvimgcodec_impl for 8 Pythons, tools/,
#                        __init__.py: nvidia.dali never imports nvidia.nvimgcodec), include/.
#   nvidia/cu13/lib      libnvjpeg.so.13, which the nvjpeg extension dlopens (RUNPATH $ORIGIN/../../cu13/lib);
#                        torch's CUDA wheels on the device bring no nvJPEG. Left out: include/.
#   astunparse gast optree packaging six   imported by `import nvidia.dali` (autograph and pytrees;
#                        six by astunparse: without it the import fails and every DALI test skips).
#                        numpy and typing_extensions are on the device already.
#   Not packed at all, though DALI's wheel names them as requirements:
#     nvidia-libnvcomp-cu13   libnvcomp.so.5 is dlopened by DALI's decompression operator
#                        (fn.experimental.inflate) and by nvImageCodec's nvtiff extension only; the
#                        data pipelines use neither (33 MB)
#     nvidia-nvjpeg2k-cu13, nvidia-nvtiff-cu13   the JPEG 2000 and TIFF decoders of the left-out extensions
#     libcst, makefun, nvtx   imported only by nvidia.dali.experimental.dynamic (DALI's eager
#                        "dynamic mode"), which cps_fast does not use (20 MB)
# Then every ELF file is stripped of its symbol tables (`strip --strip-unneeded`: 85 MB; the dynamic
# symbols stay) and the GPU code for archs other than sm_90 is blanked in the CUDA fat binaries
# (benchmarks/gpu/prune_fatbin.py, which says why and checks the result byte for byte): those
# images are compressed already, 98 MB of them. Without that step the pack was 128 MiB (xz -9; more
# than two calls carry with the working tree), with it 49.5 MiB (benchmarks/NOTES.md "The DALI
# pack"). The pack therefore runs on compute capability 9.0 only (H100, H200); DALI_ARCH=NN packs
# another arch's code instead, DALI_BLANK=0 blanks nothing (about 128 MiB: more parts than plan-20.tsv has).
#
# Settings (environment): DALI_WHEELS=/tmp/cps_fast_dali_wheels (the download cache), DALI_ARCH=90, DALI_BLANK=1,
# XZ_THREADS=2, PLANFILE=benchmarks/gpu/plan-20.tsv, PY=python3 (any Python with pip: the wheels
# are chosen for Python 3.12 whatever it is).
set -euo pipefail
cd -P "$(dirname "$0")/../.."
PY=${PY:-python3}
PLANFILE=${PLANFILE:-benchmarks/gpu/plan-20.tsv}
WHEELS=${DALI_WHEELS:-${TMPDIR:-/tmp}/cps_fast_dali_wheels}
ARCH=${DALI_ARCH:-90}
BLANK=${DALI_BLANK:-1}
XZ_THREADS=${XZ_THREADS:-2}
OUTDIR=.dali
say() { echo "pack_dali: $*"; }
die() { echo "pack_dali: $*" >&2; exit 1; }
for tool in readelf strip xz sha256sum; do command -v $tool > /dev/null || die "needs $tool (binutils, xz-utils, coreutils)"; done
[[ $ARCH =~ ^[0-9]+$ ]] || die "DALI_ARCH=$ARCH: expected an SM arch number such as 90"

SPECS=(
  nvidia-dali-cuda130==2.4.0        # DALI 2.4 for CUDA 13
  nvidia-nvimgcodec-cu13==0.9.0.20  # the decoders DALI loads (its requirement: >=0.9.0,<0.10.0)
  nvidia-nvjpeg==13.3.2.43          # libnvjpeg.so.13 for the GPU JPEG decoder
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0  # DALI's bounds: astunparse<=1.6.3, gast<=0.7.0
  six==1.17.0 packaging==26.3       # DALI's bounds: six<=1.17, packaging<=26.3
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")

# the parts' caps from the plan: `carry N .dali/dali.tar.xz.K MIB`, in part order
mapfile -t CAPS < <(awk '$1 == "carry" && $3 ~ /^\.dali\/dali\.tar\.xz\.[0-9]+$/ {
  k = substr($3, length(".dali/dali.tar.xz.") + 1); print k, $4 }' "$PLANFILE" | sort -n)
(( ${#CAPS[@]} )) || die "$PLANFILE has no 'carry N .dali/dali.tar.xz.K MIB' row"
for k in "${!CAPS[@]}"; do
  [[ ${CAPS[$k]%% *} == $(( k + 1 )) ]] || die "$PLANFILE: the DALI parts' carry rows must be .1, .2, ... in order"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/cps_fast_dali_pack.XXXXXX")
trap 'rm -rf "$work"' EXIT
site=$work/site

say "wheels (cached in $WHEELS)"
mkdir -p "$WHEELS"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$WHEELS" "${SPECS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
"$PY" -m pip install -q --no-deps --no-index --no-compile --find-links "$WHEELS" "${TARGET[@]}" \
  --target "$site" "${SPECS[@]}" 2>&1 | grep -v -e '^WARNING: Running pip as' -e '^WARNING: Location' || true
[[ -f $site/nvidia/dali/__init__.py ]] || die "the wheels did not install into $site"
raw_installed=$(du -sb "$site" | cut -f1)

say "pruning (see the comments at the top of this file)"
cd "$site"
rm -rf nvidia/dali/include nvidia/cu13/include nvidia/nvimgcodec/include nvidia/nvimgcodec/tools \
  nvidia/nvimgcodec/__init__.py bin
find nvidia -name 'nvimgcodec_impl.*.so' -delete
find nvidia -name '*.cpython-*.so' ! -name '*.cpython-312-x86_64-linux-gnu.so' -delete
for f in nvidia/nvimgcodec/extensions/*; do
  case ${f##*/} in libnvjpeg_ext.so.* | libjpeg_turbo_ext.so.* | libopencv_ext.so.*) ;; *) rm -f "$f" ;; esac
done
for need in libnvjpeg_ext libjpeg_turbo_ext libopencv_ext; do
  ls nvidia/nvimgcodec/extensions/$need.so.* > /dev/null 2>&1 || die "nvImageCodec's $need extension is not in its wheel"
done
[[ -f nvidia/cu13/lib/libnvjpeg.so.13 && -f nvidia/nvimgcodec/libnvimgcodec.so.0 ]] || die "libnvjpeg.so.13 or libnvimgcodec.so.0 missing"
# .libs: keep what the kept libraries NEED, transitively (readelf -d), drop the rest
is_elf() { [[ $(head -c 4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }
needed() { readelf -d "$1" 2> /dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
declare -A keep=()
queue=()
while IFS= read -r -d '' f; do is_elf "$f" && queue+=("$f"); done < <(find nvidia -type f ! -path '*/.libs/*' -print0)
while (( ${#queue[@]} )); do
  f=${queue[0]}; queue=("${queue[@]:1}")
  for lib in $(needed "$f"); do
    if [[ -f nvidia/dali/.libs/$lib && -z ${keep[$lib]:-} ]]; then keep[$lib]=1; queue+=("nvidia/dali/.libs/$lib"); fi
  done
done
for f in nvidia/dali/.libs/*; do
  [[ -n ${keep[${f##*/}]:-} ]] || { say "  not needed by any kept library: ${f#nvidia/}"; rm -f "$f"; }
done
# the packages left out have no files here (never installed); their dist-info neither
while IFS= read -r -d '' f; do is_elf "$f" && strip --strip-unneeded "$f"; done < <(find . -type f -print0)
stripped=$(du -sb . | cut -f1)
cd - > /dev/null
if [[ $BLANK != 0 ]]; then
  cp -a "$site" "$work/unpruned"
  "$PY" benchmarks/gpu/prune_fatbin.py --arch "$ARCH" "$site" | tail -1
  "$PY" benchmarks/gpu/prune_fatbin.py --arch "$ARCH" "$site" --check "$work/unpruned" | tail -1
  rm -rf "$work/unpruned"
  echo "DALI 2.4.0 pack for sm_$ARCH, Python 3.12; made by benchmarks/gpu/pack_dali.sh" > "$site/.cps_fast_dali_pack.txt"
else
  say "DALI_BLANK=0: every arch's GPU code kept"
  echo "DALI 2.4.0 pack for every arch, Python 3.12; made by benchmarks/gpu/pack_dali.sh" > "$site/.cps_fast_dali_pack.txt"
fi
raw=$(du -sb "$site" | cut -f1)

say "compressing (xz -9 with the x86 filter, $XZ_THREADS threads)"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$site" -cf - . \
  | xz --x86 --lzma2=preset=9 -T"$XZ_THREADS" -c > "$work/dali.tar.xz"
packed=$(stat -c %s "$work/dali.tar.xz")

# as few parts as fit, each at most its plan cap
rm -rf "$OUTDIR" && mkdir "$OUTDIR"
left=$packed offset=0 n=0
for row in "${CAPS[@]}"; do
  (( left > 0 )) || break
  k=${row%% *} cap=$(( ${row#* } * 1048576 ))
  take=$(( left < cap ? left : cap ))
  dd if="$work/dali.tar.xz" of="$OUTDIR/dali.tar.xz.$k" bs=1M iflag=skip_bytes,count_bytes skip="$offset" \
    count="$take" status=none
  offset=$(( offset + take )) left=$(( left - take )) n=$k
done
if (( left > 0 )); then
  rm -rf "$OUTDIR"
  die "the pack is $packed bytes ($(( packed / 1048576 )) MiB): more than the $PLANFILE carry rows for .dali/dali.tar.xz.N allow"
fi
(cd "$OUTDIR" && sha256sum dali.tar.xz.* > SHA256SUMS)
cat "$OUTDIR"/dali.tar.xz.* | cmp -s - "$work/dali.tar.xz" || die "the parts do not add up to the pack"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1)
say "sizes: the wheels installed $(mib "$raw_installed"), pruned and stripped $(mib "$stripped") (the same" \
  "$(mib "$raw") once the other archs' GPU code is zeros), packed $(mib "$packed") in $n part(s)"
for f in "$OUTDIR"/*; do echo "  $(stat -c %s "$f") bytes  $(mib "$(stat -c %s "$f")")  $f"; done
# each call's carried paths (as they are here) with the working tree, against the tool's 64 MiB
for call in $(awk '$1 == "carry" { print $2 }' "$PLANFILE" | sort -u); do
  total=$tree
  for path in $(awk -v c="$call" '$1 == "carry" && $2 == c { print $3 }' "$PLANFILE"); do
    [[ -e $path ]] && total=$(( total + $(du -sb "$path" | cut -f1) ))
  done
  echo "  call $call carries $(mib "$total") with the working tree ($(mib "$tree")) of the 64 MiB a call may carry"
  (( total <= 64 * 1048576 )) || die "call $call would carry more than 64 MiB"
done
