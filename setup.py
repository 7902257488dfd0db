"""Build and install cps-fast.

The extension ``cps_fast._C`` is compiled from ``csrc/`` with ninja:
the C++ (CPU) sources always, the CUDA sources when torch was built with CUDA
and nvcc is found.

Environment switches:
  CPS_FAST_SKIP_CUDA_BUILD=1   build the CPU part only
  CPS_FAST_CUDA_ARCHS="80;90a" CUDA targets (default: sm_80 and sm_90a)
  CPS_FAST_PORTABLE=1          no -march=native (for wheels that run on other CPUs)

Install with ``pip install --no-build-isolation -e .`` after torch, so that
pip builds against the torch already installed instead of pulling another.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


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
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        raise RuntimeError(f"no C++ sources found in {os.path.join(ROOT, 'csrc')}")
    with_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("CPS_FAST_SKIP_CUDA_BUILD", "0") != "1"
    )
    cxx = ["-O3", "-std=c++17"]
    # A source install compiles on the machine that runs it: use its vector units (AVX2 /
    # AVX-512 make the CPU loss kernel about 1.6x faster than baseline SSE2). Set
    # CPS_FAST_PORTABLE=1 when building a wheel for other machines.
    if os.environ.get("CPS_FAST_PORTABLE", "0") != "1":
        cxx.append("-march=native")
    openmp = ["-fopenmp"]
    if with_cuda:
        archs = os.environ.get("CPS_FAST_CUDA_ARCHS", "80;90a")
        ext = CUDAExtension(
            "cps_fast._C",
            cpp + cu,
            define_macros=[("CPS_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx + openmp,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + _gencode_flags(archs),
            },
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("cps_fast._C", cpp, extra_compile_args=cxx + openmp, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
    package_data={"cps_fast": ["configs/*.py"]},
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
        "test": ["pytest>=7.0"],
    },
    entry_points={"console_scripts": ["cps-fast=cps_fast.cli:main"]},
    zip_safe=False,
)
