"""Build and install cps-fast.

The extension ``cps_fast._C`` is compiled from ``csrc/`` with ninja:
the C++ (CPU) sources always, the CUDA sources when torch was built with CUDA
and nvcc is found.

Environment switches:
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

Install with ``pip install --no-build-isolation -e .`` after torch, so that
pip builds against the torch already installed instead of pulling another.
"""
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _recipe(torch) -> dict:
    """What a build with the current switches compiles: sources, whether CUDA, and the exact flags."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        raise RuntimeError(f"no C++ sources found in {os.path.join(ROOT, 'csrc')}")
    # CUDA kernels are asked for when torch has CUDA and they are not switched off; compiling
    # them also needs nvcc (CUDA_HOME), which a prebuilt extension does not
    cuda = bool(cu) and torch.version.cuda is not None and os.environ.get("CPS_FAST_SKIP_CUDA_BUILD", "0") != "1"
    portable = os.environ.get("CPS_FAST_PORTABLE", "0") == "1"
    cxx = ["-O3", "-std=c++17"]
    # A source install compiles on the machine that runs it: use its vector units (AVX2 /
    # AVX-512 make the CPU loss kernel about 1.6x faster than baseline SSE2). Set
    # CPS_FAST_PORTABLE=1 when building a wheel for other machines.
    if not portable:
        cxx.append("-march=native")
    openmp = ["-fopenmp"]
    archs = os.environ.get("CPS_FAST_CUDA_ARCHS", "80;90a") if cuda else None
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + _gencode_flags(archs) if cuda else None
    return {"cpp": cpp, "cu": cu, "cuda": cuda, "archs": archs, "portable": portable,
            "cxx": cxx + openmp, "nvcc": nvcc, "ld": openmp}


def _sources_sha256() -> str:
    """One hash of every file in csrc/ (names and contents): the sources an extension was built from."""
    h = hashlib.sha256()
    folder = os.path.join(ROOT, "csrc")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _identity(torch, recipe: dict) -> dict:
    """The stamp fields a prebuilt extension must match to stand in for the build ``recipe`` describes."""
    return {
        "module": "cps_fast._C",
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "archs": recipe["archs"],
        "portable": recipe["portable"],
        "cpu": None if recipe["portable"] else _cpu_model(),  # -march=native runs only where it was built
        "sources_sha256": _sources_sha256(),
        "flags": {"cxx": recipe["cxx"], "nvcc": recipe["nvcc"], "ld": recipe["ld"]},
    }


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


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        # never build without the extension by accident (pip's isolated build env has no torch)
        raise RuntimeError(
            f"cps-fast builds its extension against the installed torch, but torch does not import "
            f"here ({exc}). Install torch first, then `pip install --no-build-isolation -e .`"
        ) from exc

    os.chdir(ROOT)  # sources are given relative to the project root
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
        packages=find_packages(include=["cps_fast", "cps_fast.*"]) + ["cps_fast.kernels"],
        package_dir={"cps_fast.kernels": "kernels"},
        package_data={"cps_fast": ["configs/*.py", "data/paper_splits/*", "data/paper_splits/*/*",
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
            "test": ["pytest>=7.0", "scipy>=1.7"],
            "prepare": ["scipy>=1.7"],  # cps-fast prepare voc: SBD's MATLAB labels
        },
        entry_points={"console_scripts": ["cps-fast=cps_fast.cli:main"]},
        zip_safe=False,
    )
