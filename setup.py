"""Build and install cps-fast.

Two kinds of install:

* ``pip install .``, ``pip wheel .``, ``pip install git+URL`` (pip's isolated build, which has no
  torch): a pure-Python wheel that installs beside whichever torch the user has. It carries the
  extension's sources as ``cps_fast/csrc/``; ``python -m cps_fast.build`` (or ``CPS_FAST_JIT=1``,
  on first use) compiles them into a cache (cps_fast/build.py). Until then the triton and torch
  backends run, and the cpu/cuda ones say why they cannot.
* ``pip install --no-build-isolation [-e] .`` after torch (the README's commands, CI): the
  extension ``cps_fast._C`` is compiled now, with ninja, against that torch: the C++ (CPU)
  sources always, the CUDA sources when torch was built with CUDA and nvcc is found.

Environment switches (the recipe, sources and flags, is cps_fast/build.py's, shared with the
first-use build):
  CPS_FAST_BUILD_EXT=auto|1|0  compile cps_fast._C: when torch imports (auto, the default), always
                               (1: an error where torch does not import), or never (0: pure Python)
  CPS_FAST_SKIP_CUDA_BUILD=1   build the CPU part only
  CPS_FAST_CUDA_ARCHS="80;90a" CUDA targets (default: sm_80 and sm_90a)
  CPS_FAST_PORTABLE=1          no -march=native (for wheels that run on other CPUs)
  CPS_FAST_PREBUILT=X.so       install X.so (relative paths: to this folder) instead of compiling,
                               when its stamp X.json (benchmarks/gpu/build_prebuilt.sh writes both)
                               names this torch, Python, csrc/ and the flags these switches ask for,
                               its checksum holds, and it imports (with CUDA kernels exactly when
                               the build asked for would have them, for this GPU's architecture);
                               otherwise build as usual, saying why in one line (``pip -v`` shows it)
  CPS_FAST_PREBUILT_PROBED=HEX with CPS_FAST_PREBUILT: the sha256 of that file, whose import this
                               machine has just probed (benchmarks/gpu/check_prebuilt.py, for
                               benchmarks/gpu/install.sh): while the file still has that checksum
                               the build skips its own probe (a second import of torch and CUDA
                               start-up); the stamp's checks still run
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _recipe_module():
    """cps_fast/build.py, loaded by its path (not as part of the package, which imports torch): the
    one recipe (sources, flags) and identity of the extension, shared with its first-use build."""
    spec = importlib.util.spec_from_file_location("cps_fast_build_recipe", os.path.join(ROOT, "cps_fast", "build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_build = _recipe_module()
_gencode_flags = _build.gencode_flags
_cpu_model = _build.cpu_model


def _recipe(torch) -> dict:
    """What a build with the current switches compiles: sources (relative to the project), whether CUDA, the flags."""
    return _build.recipe(torch, "csrc")


def _sources_sha256() -> str:
    """One hash of every file in csrc/ (names and contents): the sources an extension was built from."""
    return _build.sources_sha256(os.path.join(ROOT, "csrc"))


def _identity(torch, recipe: dict) -> dict:
    """The stamp fields a prebuilt extension must match to stand in for the build ``recipe`` describes."""
    return _build.identity(torch, recipe, os.path.join(ROOT, "csrc"))


# loads a built extension beside torch in a child process, so a bad binary cannot take setup down
_PROBE = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("cps_fast._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
cap = list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
print(json.dumps({"has_cuda": bool(mod.has_cuda()), "capability": cap}))
"""


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _prebuilt_refusal(path: str, identity: dict, probed_sha256: str | None = None) -> str | None:
    """Why the prebuilt extension at ``path`` cannot stand in for this build, or None when it can.

    ``probed_sha256``: the checksum of a file whose import probe already passed on this machine;
    when ``path`` has exactly it, the probe (a child process importing torch and the file) is not
    run again. Every other check is."""
    stamp_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path):
        return f"{path} does not exist"
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
    except (OSError, ValueError) as exc:
        return f"its stamp {stamp_path} does not read: {exc}"
    if not isinstance(stamp, dict):
        return f"its stamp {stamp_path} is not a JSON object"
    for key, want in identity.items():
        if stamp.get(key) != want:
            return f"{stamp_path} has {key}={stamp.get(key)!r}, this build needs {want!r}"
    digest = _file_sha256(path)
    if stamp.get("sha256") != digest:
        return f"{path} has sha256 {digest[:16]}..., its stamp says {str(stamp.get('sha256'))[:16]}... (changed since)"
    if probed_sha256 is not None and probed_sha256 == digest:
        return None
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"{path}: importing it took over 600 s"
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        return f"{path} does not import: {lines[-1] if lines else f'exit {probe.returncode}'}"
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    want_cuda = identity["archs"] is not None
    if got["has_cuda"] != want_cuda:
        return f"{path} reports has_cuda()={got['has_cuda']}, this build asks for {want_cuda}"
    if want_cuda and got["capability"] is not None:
        sm = "{}{}".format(*got["capability"])
        built = {a.strip().replace("sm_", "").replace(".", "").rstrip("af")
                 for a in identity["archs"].replace(",", ";").split(";") if a.strip()}
        if sm not in built:
            return f"this GPU is sm_{sm}, {path} has kernels for sm_{identity['archs']} only"
    return None


def _build_ext(BuildExtension, torch, recipe: dict):
    """torch's ninja build_ext; with CPS_FAST_PREBUILT, one that first asks whether the prebuilt
    extension can stand in (once, at build time, not at every setup.py run pip makes) and then
    puts it where the build would have written it, or says why not and compiles."""
    base = BuildExtension.with_options(use_ninja=True)
    prebuilt = os.environ.get("CPS_FAST_PREBUILT", "")
    if not prebuilt:
        return base
    path = os.path.abspath(prebuilt)  # relative to the project (setup.py works from there)
    probed = os.environ.get("CPS_FAST_PREBUILT_PROBED") or None

    class build_ext_or_prebuilt(base):
        def build_extensions(self):
            why = _prebuilt_refusal(path, _identity(torch, recipe), probed)
            if why is not None:
                print(f"cps-fast: CPS_FAST_PREBUILT not used, compiling instead: {why}", file=sys.stderr)
                return super().build_extensions()
            how = ""
            if probed is not None:  # _prebuilt_refusal skipped its probe exactly when the checksums agree
                how = (" (its import probed before the build: CPS_FAST_PREBUILT_PROBED)" if probed == _file_sha256(path)
                       else " (probed again: CPS_FAST_PREBUILT_PROBED names another checksum)")
            print(f"cps-fast: CPS_FAST_PREBUILT: installing {path} without compiling{how}", file=sys.stderr)
            for ext in self.extensions:
                dest = self.get_ext_fullpath(ext.name)
                os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
                shutil.copyfile(path, dest)
                os.chmod(dest, 0o755)

    return build_ext_or_prebuilt


def _ext_switch() -> str:
    """``CPS_FAST_BUILD_EXT``: ``1`` (compile cps_fast._C, torch must import), ``0`` (never), or
    ``auto`` (the default: compile when torch imports, else a pure-Python package)."""
    value = os.environ.get("CPS_FAST_BUILD_EXT", "").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"cps-fast: CPS_FAST_BUILD_EXT={value!r}: expected 1 (compile cps_fast._C), "
                         "0 (a pure-Python package) or auto")
    return value


def _extensions():
    """The extension modules and build command to build, or ``([], {})`` for a pure-Python package,
    which carries the sources for a first-use build (cps_fast/build.py); the choice, said in one line."""
    os.chdir(ROOT)  # sources and package folders are given relative to the project root
    switch = _ext_switch()
    prebuilt = os.environ.get("CPS_FAST_PREBUILT", "")
    if switch == "0":
        if prebuilt:
            raise SystemExit("cps-fast: CPS_FAST_PREBUILT installs an extension, CPS_FAST_BUILD_EXT=0 asks for none")
        print("cps-fast: CPS_FAST_BUILD_EXT=0: not compiling cps_fast._C (pure-Python package; "
              "`python -m cps_fast.build` compiles it later)", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        if switch == "1" or prebuilt:
            why = "CPS_FAST_PREBUILT" if prebuilt else "CPS_FAST_BUILD_EXT=1"
            raise RuntimeError(
                f"cps-fast: {why} asks for the extension, which builds against the installed torch, but torch "
                f"does not import here ({exc}). Install torch first, then `pip install --no-build-isolation -e .`"
            ) from exc
        # pip's isolated build environment has no torch (and must not fetch one: the wheel has to
        # work beside whichever torch the user has), so the wheel is pure Python
        print(f"cps-fast: torch does not import here ({exc}; an isolated build), so cps_fast._C is not compiled: "
              "the package carries its sources for `python -m cps_fast.build` or CPS_FAST_JIT=1 (cached), "
              "or install after torch with --no-build-isolation to compile it now", file=sys.stderr)
        return [], {}

    recipe = _recipe(torch)
    with_cuda = recipe["cuda"] and CUDA_HOME is not None
    if with_cuda:
        ext = CUDAExtension(
            "cps_fast._C",
            recipe["cpp"] + recipe["cu"],
            define_macros=[("CPS_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": recipe["cxx"], "nvcc": recipe["nvcc"]},
            extra_link_args=recipe["ld"],
        )
    else:
        ext = CppExtension("cps_fast._C", recipe["cpp"], extra_compile_args=recipe["cxx"],
                           extra_link_args=recipe["ld"])
    return [ext], {"build_ext": _build_ext(BuildExtension, torch, recipe)}


# python setup.py, pip and setuptools run this file as __main__; importing it (tests,
# benchmarks/gpu/build_prebuilt.sh) only defines the functions above
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()

    setup(
        name="cps-fast",
        version="0.1.0",
        description="Fast semi-supervised semantic segmentation with Cross Pseudo Supervision: "
        "fused CPS loss (Triton / CUDA / C++), DALI data, CUDA-graph training.",
        long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        # csrc/ travels as cps_fast/csrc/ (sources only) for the first-use build of a pure-Python wheel
        packages=find_packages(include=["cps_fast", "cps_fast.*"]) + ["cps_fast.kernels", "cps_fast.csrc"],
        package_dir={"cps_fast.kernels": "kernels", "cps_fast.csrc": "csrc"},
        package_data={"cps_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh", "*.inc"],
                      "cps_fast": ["configs/*.py", "data/paper_splits/*", "data/paper_splits/*/*",
                                   "data/paper_splits/*/*/*", "data/paper_splits/*/*/*/*"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=[
            "torch>=2.4",
            "triton>=3.0; platform_system == 'Linux'",
            "numpy>=1.24",
            "pillow>=9.0",
        ],
        extras_require={
            "dali": ["nvidia-dali-cuda130>=1.40"],
            "tensorboard": ["tensorboard>=2.10"],
            "test": ["pytest>=7.0", "pytest-xdist>=3.2", "scipy>=1.7"],
            "prepare": ["scipy>=1.7"],  # cps-fast prepare voc: SBD's MATLAB labels
            "jit": ["ninja"],  # compiling cps_fast._C after install (python -m cps_fast.build, CPS_FAST_JIT=1)
        },
        entry_points={"console_scripts": ["cps-fast=cps_fast.cli:main"]},
        zip_safe=False,
    )
