"""Blanks the GPU code a Hopper GPU never loads from shared libraries' CUDA fat binaries (issue 20).

DALI's wheel carries every kernel for sm_75, 80, 90, 100, 110 and 120 and PTX for compute_120 in
its libraries' fat binaries: 71 MB of libdali_operators.so's 193 MB (stripped), 10 + 13 MB of
libdali_kernels.so's 41, 15 MB of libcvcuda's. Those images are compressed already (xz gains about
1 % on them), so they are that many megabytes of the pack too, and the pack must travel in the
64 MiB a device call may carry. A GPU of compute capability 9.0 (H100, H200) runs the sm_90 cubin
of a fat binary and nothing else of it: the driver picks the image by the entry headers' kind and
arch, SASS of another major arch cannot run there, nor PTX for compute_120.

So, in every fat binary (a ``0xBA55ED50`` header and its entries) that holds an ELF (cubin) entry
for the kept arch, every other entry's payload is overwritten with zeros, in place: the headers,
the sections and the file keep their sizes and offsets (nothing is relinked), the kept cubins
stay byte for byte, and the zeros compress to nothing. A fat binary without a cubin for the kept
arch is left alone (its PTX may be what a JIT would use). The sections searched are
``.nv_fatbin`` (what the CUDA runtime registers) and ``__nv_relfatbin`` (relocatable device code
for device linking, kept the same way: should anything load it, its sm_90 code is intact).

    python benchmarks/gpu/prune_fatbin.py [--arch 90] [--check ORIGINAL_DIR] FILE_OR_DIR...

Prints, per file changed, the bytes blanked. ``--check ORIGINAL_DIR`` (after a run; the same
relative paths under it) verifies each pruned file against its original instead: the same bytes
except the blanked payloads, which are zeros. Exit 0, or 1 with what is wrong. On the device,
check_dali_pack.py then runs DALI's GPU kernels.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
ELF_MAGIC = b"\x7fELF"
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """``{name: (file offset, size)}`` of an ELF64 little-endian file's sections with contents."""
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = heads[shstrndx][4]
    out = {}
    for name_off, sh_type, _flags, _addr, off, size in heads:
        if sh_type == 8:  # SHT_NOBITS: no bytes in the file
            continue
        end = data.index(b"\0", str_off + name_off)
        out[data[str_off + name_off:end].decode()] = (off, size)
    return out


def fatbins(data: bytes, start: int, size: int):
    """Each fat binary in ``data[start:start + size]``: a list of ``(kind, arch, payload offset,
    payload size)`` per entry, offsets into ``data``."""
    off, end = start, start + size
    while off + 16 <= end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, off)
        if magic != FATBIN_MAGIC:  # fat binaries are 8-byte aligned in the section
            off += 8
            continue
        entry, stop = off + hsize, off + hsize + fsize
        if stop > end:
            raise ValueError(f"a fat binary at {off:#x} runs past its section's end ({stop:#x} > {end:#x})")
        entries = []
        while entry < stop:
            kind, _u, ehsize, psize = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if ehsize < 64 or entry + ehsize + psize > stop:
                raise ValueError(f"a fat binary entry at {entry:#x} is malformed (header {ehsize}, payload {psize})")
            entries.append((kind, arch, entry + ehsize, psize))
            entry += ehsize + psize
        yield entries
        off = stop


def blank_ranges(data: bytes, arch: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(ranges to blank, kept cubins)`` as ``(offset, size)`` lists for one file."""
    found = sections(data)
    blank, kept = [], []
    for name in FATBIN_SECTIONS:
        if name not in found:
            continue
        for entries in fatbins(data, *found[name]):
            keep = [e for e in entries if e[0] == KIND_ELF and e[1] == arch]
            if not keep:
                continue
            kept += [(o, s) for _, _, o, s in keep]
            blank += [(o, s) for k, a, o, s in entries if not (k == KIND_ELF and a == arch)]
    return blank, kept


def elf_files(paths: list[str]):
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                if fh.read(4) == ELF_MAGIC:
                    yield f


def prune(path: Path, arch: int) -> int:
    data = bytearray(path.read_bytes())
    blank, _ = blank_ranges(bytes(data), arch)
    for off, size in blank:
        data[off:off + size] = bytes(size)
    if blank:
        tmp = path.with_name(path.name + ".pruning")
        tmp.write_bytes(data)
        os.chmod(tmp, path.stat().st_mode)
        os.replace(tmp, path)
    return sum(s for _, s in blank)


def check(path: Path, original: Path, arch: int) -> str | None:
    """Why ``path`` is not ``original`` pruned for ``arch``, or None."""
    new, old = path.read_bytes(), original.read_bytes()
    if len(new) != len(old):
        return f"{path}: {len(new)} bytes, its original {original} has {len(old)}"
    blank, kept = blank_ranges(old, arch)
    expected = bytearray(old)
    for off, size in blank:
        expected[off:off + size] = bytes(size)
    for off, size in kept:
        if new[off:off + size] != old[off:off + size]:
            return f"{path}: the sm_{arch} cubin at {off:#x} differs from the original"
    if new != expected:
        first = next(i for i in range(0, len(new), 4096) if new[i:i + 4096] != expected[i:i + 4096])
        return (f"{path}: differs from its original with the other archs' payloads zeroed "
                f"(first in the 4 KiB block at {first:#x})")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="files, or folders searched for ELF files")
    p.add_argument("--arch", type=int, default=90, help="the SM arch whose cubins are kept (default 90: H100/H200)")
    p.add_argument("--check", metavar="ORIGINAL_DIR", default=None,
                   help="verify instead: each file (under the folders given) against the same relative path here")
    args = p.parse_args(argv)
    if args.check is not None:
        bad = 0
        for root in map(Path, args.paths):
            for f in elf_files([str(root)]):
                rel = f.relative_to(root) if root.is_dir() else Path(f.name)
                orig = Path(args.check) / rel
                if not orig.exists():
                    print(f"prune_fatbin: {orig} missing (the original of {f})")
                    bad += 1
                    continue
                why = check(f, orig, args.arch)
                if why:
                    print(f"prune_fatbin: {why}")
                    bad += 1
        print(f"prune_fatbin: {'verified' if not bad else f'{bad} files wrong'} against {args.check}")
        return 1 if bad else 0
    total = 0
    for f in elf_files(args.paths):
        try:
            n = prune(f, args.arch)
        except ValueError as exc:
            print(f"prune_fatbin: {f}: {exc}", file=sys.stderr)
            return 1
        if n:
            print(f"prune_fatbin: {f}: {n / 1e6:.1f} MB of other archs' GPU code blanked")
            total += n
    print(f"prune_fatbin: {total / 1e6:.1f} MB blanked in all (sm_{args.arch} cubins kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
