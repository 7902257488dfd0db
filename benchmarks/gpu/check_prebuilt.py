"""Whether a prebuilt cps_fast._C can stand in for compiling it here, by setup.py's own rules.

    python benchmarks/gpu/check_prebuilt.py .prebuilt/cps_fast_C-torch2.11.0+cu130-py312-sm90a.so

Prints one line, ``prebuilt ok: PATH sha256=HEX`` (exit 0) or ``prebuilt refused: WHY`` (exit 3). It is the
check ``CPS_FAST_PREBUILT=PATH pip install ...`` makes (setup.py's ``_prebuilt_refusal``: the
stamp PATH.json against this torch, Python, csrc/ and the flags that CPS_FAST_CUDA_ARCHS and
CPS_FAST_PORTABLE ask for, the file's checksum, and an import that reports CUDA kernels exactly
when such a build would have them, for the GPU present), made before pip so that the GPU run
knows in seconds whether to install it or to compile (benchmarks/gpu/install.sh), and so that
benchmarks/gpu/build_prebuilt.sh knows whether its output is up to date. The checksum printed is
the file's whose import was just probed: install.sh hands it to the build as
``CPS_FAST_PREBUILT_PROBED``, so that setup.py does not import it (torch, CUDA start-up) once more.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_setup():
    """setup.py as a module: its functions, without running setup() (that happens only as __main__)."""
    spec = importlib.util.spec_from_file_location("cps_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusal(path: str | os.PathLike) -> str | None:
    """Why the extension at ``path`` cannot stand in for a build here, or None when it can."""
    import torch

    setup = load_setup()
    path = os.path.abspath(path)
    cwd = os.getcwd()
    os.chdir(setup.ROOT)  # the recipe globs csrc/ relative to the project, as setup.py does
    try:
        return setup._prebuilt_refusal(path, setup._identity(torch, setup._recipe(torch)))
    finally:
        os.chdir(cwd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    why = refusal(argv[0])
    if why is not None:
        print(f"prebuilt refused: {why}")
        return 3
    with open(argv[0], "rb") as f:
        print(f"prebuilt ok: {argv[0]} sha256={hashlib.sha256(f.read()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
