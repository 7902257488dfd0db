"""The extension ``cps_fast._C``: the installed one, or one compiled from the sources into a cache.

Two ways to have it, as DeepSpeed's op builders offer:

* ahead of time: a source install after torch, ``pip install --no-build-isolation [-e] .``, compiles
  it into the package (setup.py, with the recipe below);
* from the sources that every install carries (``cps_fast/csrc/`` in a wheel, ``csrc/`` in a
  checkout), with ``torch.utils.cpp_extension.load`` into a cache folder keyed by everything the
  binary depends on (torch, Python, the sources' checksum, the flags), when asked::

      python -m cps_fast.build            compile it now (also: cps-fast build-ext)
      python -m cps_fast.build --status   say which extension loads, from where, or why none
      CPS_FAST_JIT=1                      compile it on first use (one logged line, minutes, once)

A plain ``pip install .`` or ``pip wheel .`` builds in an environment without torch, so its wheel
is pure Python and takes the second way. Nothing compiles by surprise: an importable
``cps_fast._C`` is always used as it is, a build in the cache is loaded without a compiler, and
otherwise a process compiles only with ``CPS_FAST_JIT=1``. Where the extension is missing, cannot
be compiled (no compiler, no ninja) or fails to, :func:`load` says why in one line: the automatic
backend choice falls back to triton or torch with it, and an explicit ``backend="cpu"``/``"cuda"``
raises it (cps_fast.backends).

Environment: ``CPS_FAST_JIT`` (0 or 1, default 0), ``CPS_FAST_CACHE`` (the cache, default
``$XDG_CACHE_HOME/cps_fast`` or ``~/.cache/cps_fast``), ``CXX`` (the compiler, default ``c++``),
``CUDA_HOME`` (nvcc), and setup.py's ``CPS_FAST_SKIP_CUDA_BUILD``, ``CPS_FAST_CUDA_ARCHS``,
``CPS_FAST_PORTABLE``, which mean the same here: one recipe for both ways.

This module imports only the standard library at its top (torch inside functions): setup.py loads
it by its path for the recipe, in build environments that have no torch.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("cps_fast")

MODULE = "cps_fast._C"
JIT_ENV = "CPS_FAST_JIT"
CACHE_ENV = "CPS_FAST_CACHE"
_MARKER = "bindings.cpp"  # a folder with this file holds the extension's sources


# ----------------------------------------------------------------------------- the recipe (setup.py uses it too)


def gencode_flags(archs: str) -> list[str]:
    """nvcc's ``-gencode`` flags for ``"80;90a"`` (``,`` also separates; ``sm_`` and ``.`` are dropped)."""
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def recipe(torch, source_dir: str | os.PathLike = "csrc") -> dict:
    """What a build with the current switches compiles: sources, whether CUDA, and the exact flags."""
    cpp = sorted(glob.glob(os.path.join(source_dir, "*.cpp")))
    cu = sorted(glob.glob(os.path.join(source_dir, "*.cu")))
    if not cpp:
        raise RuntimeError(f"no C++ sources found in {os.path.abspath(source_dir)}")
    # CUDA kernels are asked for when torch has CUDA and they are not switched off; compiling
    # them also needs nvcc (CUDA_HOME), which a prebuilt extension does not
    cuda = bool(cu) and torch.version.cuda is not None and os.environ.get("CPS_FAST_SKIP_CUDA_BUILD", "0") != "1"
    portable = os.environ.get("CPS_FAST_PORTABLE", "0") == "1"
    cxx = ["-O3", "-std=c++17"]
    # A source build compiles on the machine that runs it: use its vector units (AVX2 /
    # AVX-512 make the CPU loss kernel about 1.6x faster than baseline SSE2). Set
    # CPS_FAST_PORTABLE=1 when building a wheel for other machines.
    if not portable:
        cxx.append("-march=native")
    openmp = ["-fopenmp"]
    archs = os.environ.get("CPS_FAST_CUDA_ARCHS", "80;90a") if cuda else None
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + gencode_flags(archs) if cuda else None
    return {"cpp": cpp, "cu": cu, "cuda": cuda, "archs": archs, "portable": portable,
            "cxx": cxx + openmp, "nvcc": nvcc, "ld": openmp}


def sources_sha256(folder: str | os.PathLike) -> str:
    """One hash of every file in ``folder`` (names and contents): the sources an extension is built from."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def identity(torch, recipe: dict, source_dir: str | os.PathLike) -> dict:
    """What a binary built by ``recipe`` from ``source_dir`` depends on: the fields of a prebuilt
    extension's stamp (setup.py) and of the cache key here."""
    return {
        "module": MODULE,
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "archs": recipe["archs"],
        "portable": recipe["portable"],
        "cpu": None if recipe["portable"] else cpu_model(),  # -march=native runs only where it was built
        "sources_sha256": sources_sha256(source_dir),
        "flags": {"cxx": recipe["cxx"], "nvcc": recipe["nvcc"], "ld": recipe["ld"]},
    }


# ----------------------------------------------------------------------------- where things are


def source_dir() -> Path | None:
    """The extension's sources: ``cps_fast/csrc/`` in an installed wheel, ``csrc/`` beside the
    package in a checkout or an editable install; None when neither holds them."""
    package = Path(__file__).resolve().parent
    for folder in (package / "csrc", package.parent / "csrc"):
        if (folder / _MARKER).is_file():
            return folder
    return None


def cache_root() -> Path:
    """``$CPS_FAST_CACHE``, else ``$XDG_CACHE_HOME/cps_fast``, else ``~/.cache/cps_fast``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cps_fast"


def jit_from_env() -> bool:
    """``CPS_FAST_JIT``: 1 compiles on first use, 0 or unset never; anything else is refused."""
    value = os.environ.get(JIT_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"${JIT_ENV}={value!r}: expected 0 (never compile on first use) or 1")


@dataclass(frozen=True)
class Build:
    """One build of the extension in the cache: its sources, recipe, identity and folder."""

    sources: Path
    recipe: dict
    with_cuda: bool  # the recipe asks for CUDA and nvcc is there
    identity: dict
    directory: Path

    @property
    def kernels(self) -> str:
        """Which kernels this build compiles, in words."""
        if self.with_cuda:
            return f"C++ and CUDA kernels (sm_{self.recipe['archs']})"
        if self.recipe["cuda"]:
            return "C++ kernels only: this torch has CUDA, but nvcc is not found (set CUDA_HOME)"
        return "C++ kernels"

    @property
    def library(self) -> Path:
        return self.directory / "_C.so"  # torch's load names it after the module, `_C`

    @property
    def stamp(self) -> Path:
        return self.directory / "built.json"  # written last: the build in this folder is complete

    @property
    def failure(self) -> Path:
        return self.directory / "failed.json"

    @property
    def log(self) -> Path:
        return self.directory / "build.log"

    def built(self) -> bool:
        try:
            stamp = json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return False
        return stamp.get("identity") == self.identity and self.library.is_file()


def plan(cache: str | os.PathLike | None = None, sources: str | os.PathLike | None = None) -> Build:
    """The build that this torch, Python, these sources and switches call for, and its cache folder
    (``cache``: default :func:`cache_root`; ``sources``: default :func:`source_dir`)."""
    import torch

    folder = Path(sources) if sources is not None else source_dir()
    if folder is None:
        package = Path(__file__).resolve().parent
        raise FileNotFoundError(f"its C++ sources are not in this install ({package / 'csrc'} and "
                                f"{package.parent / 'csrc'} hold no {_MARKER})")
    r = recipe(torch, folder)
    with_cuda = r["cuda"] and _cuda_home() is not None
    ident = identity(torch, r, folder)
    key = hashlib.sha256(json.dumps([ident, with_cuda], sort_keys=True).encode()).hexdigest()[:16]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(cache).expanduser() if cache is not None else cache_root()
    return Build(folder, r, with_cuda, ident, root / "ext" / f"torch{torch.__version__}-{py}-{key}")


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


# ----------------------------------------------------------------------------- compiling and loading


def _tool_path() -> str:
    """PATH for the compile, with this Python's bin folder first (a venv's ninja, unactivated)."""
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def missing_tools(build: Build) -> str | None:
    """Why ``build`` cannot be compiled here (no compiler, no ninja), or None: checked before a compile starts."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx, path=_tool_path()) is None:
        return (f"no C++ compiler: CXX={cxx!r} is not found" if "CXX" in os.environ
                else "no C++ compiler: c++ is not on PATH (install g++ or clang, or set CXX)")
    if shutil.which("ninja", path=_tool_path()) is None:
        return "ninja is not installed (`pip install ninja`), which torch.utils.cpp_extension needs to compile"
    return None


# runs torch.utils.cpp_extension.load in a child process: a crash or a stuck compiler cannot take
# the caller down, its output goes to the build's log, and the caller then loads the library once
_CHILD = """
import json, sys
from torch.utils.cpp_extension import load
a = json.loads(sys.argv[1])
mod = load(name="_C", sources=a["sources"], extra_cflags=a["cflags"], extra_cuda_cflags=a["cuda_cflags"],
           extra_ldflags=a["ldflags"], build_directory=a["directory"], with_cuda=a["with_cuda"], verbose=True)
print("cps-fast-built " + json.dumps({"has_cuda": bool(mod.has_cuda())}))
"""


def _failure_line(text: str) -> str:
    """The line of a build log that says what went wrong: the first compiler error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"(^|: )(fatal )?error: ", line, re.I) and not line.startswith("RuntimeError"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def compile_extension(build: Build) -> str | None:
    """Compile ``build`` into its folder (the caller has checked :func:`missing_tools`); None when
    it succeeded, otherwise the one-line reason, also written to ``failed.json`` there."""
    r = build.recipe
    sources = [str(p) for p in r["cpp"]] + ([str(p) for p in r["cu"]] if build.with_cuda else [])
    define = ["-DCPS_FAST_WITH_CUDA=1"] if build.with_cuda else []
    args = {"sources": sources, "cflags": r["cxx"] + define, "cuda_cflags": (r["nvcc"] or []) + define,
            "ldflags": r["ld"], "directory": str(build.directory), "with_cuda": build.with_cuda}
    try:
        build.directory.mkdir(parents=True, exist_ok=True)
        build.failure.unlink(missing_ok=True)
        start = time.monotonic()
        with open(build.log, "w") as out:
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=build.directory,
                                  env=dict(os.environ, PATH=_tool_path()))
        text = build.log.read_text(errors="replace")
    except OSError as exc:
        return f"compiling it in {build.directory} failed: {exc}"
    done = [line for line in text.splitlines() if line.startswith("cps-fast-built ")]
    if proc.returncode != 0 or not done or not build.library.is_file():
        detail = f"{_failure_line(text)} (log: {build.log})"
        build.failure.write_text(json.dumps({"detail": detail}) + "\n")
        return f"compiling it failed: {detail}"
    stamp = {"identity": build.identity, "with_cuda": build.with_cuda, "seconds": round(time.monotonic() - start, 1),
             **json.loads(done[-1].split(" ", 1)[1])}
    tmp = build.stamp.with_name(f"built.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(tmp, build.stamp)
    return None


def import_built(build: Build, register: bool = True) -> ModuleType:
    """Load the library of a finished ``build`` as ``cps_fast._C`` (``register``: also put it in
    ``sys.modules`` and on the package, so that ``import cps_fast._C`` finds it)."""
    spec = importlib.util.spec_from_file_location(MODULE, build.library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if register:
        sys.modules[MODULE] = module
        if "cps_fast" in sys.modules:
            sys.modules["cps_fast"]._C = module
    return module


@dataclass(frozen=True)
class Extension:
    """What :func:`load` found: the module, or None and the one-line reason."""

    module: ModuleType | None
    error: str | None
    origin: str  # "installed", "cache" or "compiled" with the file; "" when there is no module


def load(*, jit: bool | None = None, cache: str | os.PathLike | None = None,
         sources: str | os.PathLike | None = None, register: bool = True) -> Extension:
    """The extension: the installed ``cps_fast._C`` if it imports, else a finished build in the
    cache, else, with ``jit`` (default ``$CPS_FAST_JIT``), one compiled now. Never raises for a
    missing or broken extension: the :class:`Extension` then holds the reason."""
    try:
        module = importlib.import_module(MODULE)
        return Extension(module, None, f"installed: {module.__file__}")
    except ImportError as exc:
        missing = f"the extension {MODULE} is not built ({exc})"
    try:
        if jit is None:
            jit = jit_from_env()
        build = plan(cache, sources)
    except (ValueError, OSError, RuntimeError) as exc:
        return Extension(None, f"{missing}, and {exc}", "")
    if build.built():
        try:
            return Extension(import_built(build, register), None, f"cache: {build.library}")
        except ImportError as exc:
            return Extension(None, f"{missing}, and its cached build {build.library} does not import ({exc}); "
                             f"remove {build.directory} and compile it again", "")
    if not jit:
        return Extension(None, f"{missing}; compile it once with `python -m cps_fast.build` (cached in "
                         f"{build.directory.parent}), or set {JIT_ENV}=1 to compile it on first use", "")
    if _earlier_failure(build) is not None:
        return _failed(f"{missing}, and compiling it failed before: {_earlier_failure(build)}; "
                       "`python -m cps_fast.build` tries again")
    why = missing_tools(build)
    if why is not None:
        return _failed(f"{missing}, and {JIT_ENV}=1 cannot compile it here: {why}")
    log.warning("cps_fast: compiling the extension %s (%s=1, first use; %s) into %s: once for this torch, "
                "Python, sources and flags; this takes minutes", MODULE, JIT_ENV, build.kernels, build.directory)
    start = time.monotonic()
    module, why = _compile_and_import(build, register, retry=False)
    if module is None:
        return _failed(f"{missing}, and {why}")
    log.info("cps_fast: compiled %s in %.0f s (%s)", MODULE, time.monotonic() - start, build.library)
    return Extension(module, None, f"compiled: {build.library}")


def _earlier_failure(build: Build) -> str | None:
    try:
        return json.loads(build.failure.read_text())["detail"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _failed(reason: str) -> Extension:
    """A first-use build that was asked for and did not happen: said once, as a warning."""
    log.warning("cps_fast: %s", reason)
    return Extension(None, reason, "")


def _compile_and_import(build: Build, register: bool, retry: bool) -> tuple[ModuleType | None, str | None]:
    """Compile ``build`` and load it: the module, or None and why not. One process at a time per
    cache folder: the ranks of a job (or two jobs) that start together wait for the first one's
    build and load it. ``retry``: compile even where an earlier attempt failed."""
    try:
        build.directory.mkdir(parents=True, exist_ok=True)
        lock = open(build.directory / ".cps_fast.lock", "w")  # not `lock`: torch's load takes that name
    except OSError as exc:
        return None, f"its cache folder {build.directory} cannot be written ({exc})"
    with lock:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if build.built():  # another process finished it while this one waited
            why = None
        elif not retry and _earlier_failure(build) is not None:
            why = f"compiling it failed: {_earlier_failure(build)}"
        else:
            why = compile_extension(build)
    if why is not None:
        return None, why
    try:
        return import_built(build, register), None
    except ImportError as exc:
        return None, f"its build {build.library} does not import ({exc})"


@functools.lru_cache(maxsize=None)
def current() -> Extension:
    """:func:`load` with the defaults, once per process (what cps_fast.backends asks)."""
    return load()


# ----------------------------------------------------------------------------- python -m cps_fast.build


def main(argv: list[str] | None = None, prog: str = "python -m cps_fast.build") -> int:
    p = argparse.ArgumentParser(prog=prog,
                                description="Compile the extension cps_fast._C from the sources this install carries "
                                "into the cache (where no cps_fast._C is installed), or say where it is.")
    p.add_argument("--status", action="store_true", help="say which extension loads and from where, or why none; "
                   "compile nothing")
    p.add_argument("--cache", default=None, help=f"the cache folder (default ${CACHE_ENV}, else ~/.cache/cps_fast)")
    args = p.parse_args(argv)
    found = load(jit=False, cache=args.cache)
    if found.module is not None:
        print(f"{MODULE}: {found.origin}")
        return 0
    if args.status:
        print(f"{MODULE}: unavailable: {found.error}")
        return 1
    try:
        build = plan(args.cache)
    except (OSError, RuntimeError) as exc:
        print(f"{MODULE}: cannot be compiled: {exc}", file=sys.stderr)
        return 1
    why = missing_tools(build)
    if why is not None:
        print(f"{MODULE}: cannot be compiled here: {why}", file=sys.stderr)
        return 1
    print(f"{MODULE}: compiling {build.kernels} into {build.directory} (log: {build.log}); this takes minutes",
          file=sys.stderr)
    module, why = _compile_and_import(build, register=True, retry=True)
    if module is None:
        print(f"{MODULE}: {why}", file=sys.stderr)
        return 1
    print(f"{MODULE}: compiled: {build.library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
