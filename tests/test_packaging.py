"""A plain (isolated) install: setup.py's choice of a pure-Python wheel where torch does not import,
the wheel's contents, and cps_fast.build, which finds the extension installed or in its cache or
compiles it when asked, and otherwise says why in one line. Nothing here compiles the extension:
the compiler in the one test that starts a build is a script that fails."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cps_fast import backends, build

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import check_prebuilt  # noqa: E402  (setup.py as a module, the way the prebuilt tests load it)

SWITCHES = ("CPS_FAST_BUILD_EXT", "CPS_FAST_PREBUILT", "CPS_FAST_PORTABLE", "CPS_FAST_SKIP_CUDA_BUILD",
            "CPS_FAST_CUDA_ARCHS", "CPS_FAST_JIT", "CPS_FAST_CACHE", "CXX")


@pytest.fixture(autouse=True)
def _default_switches(monkeypatch):
    for key in SWITCHES:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py's _extensions() changes into the project
    return check_prebuilt.load_setup()


@pytest.fixture
def sources(tmp_path) -> Path:
    """A copy of csrc/, so that a test may change a source without touching the checkout's."""
    return Path(shutil.copytree(ROOT / "csrc", tmp_path / "csrc"))


@pytest.fixture
def no_installed_extension(monkeypatch):
    """``import cps_fast._C`` fails, as in a pure-Python install."""
    monkeypatch.setitem(sys.modules, "cps_fast._C", None)


@pytest.fixture
def never_compile(monkeypatch):
    def refuse(b):
        raise AssertionError(f"compiled {b.directory}")

    monkeypatch.setattr(build, "compile_extension", refuse)


# ----------------------------------------------------------------------------- setup.py


def test_an_isolated_build_without_torch_is_pure_python(setup_py, monkeypatch, capsys):
    """pip's isolated build environment has no torch: the wheel then has no extension (and pulls
    no torch), unless the extension is asked for by name, which is an error saying so."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert setup_py._extensions() == ([], {})
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch does not import here" in err
    assert "python -m cps_fast.build" in err and "CPS_FAST_JIT=1" in err and "--no-build-isolation" in err
    monkeypatch.setenv("CPS_FAST_BUILD_EXT", "1")
    with pytest.raises(RuntimeError, match=r"CPS_FAST_BUILD_EXT=1 asks for the extension.*torch does not import"):
        setup_py._extensions()
    monkeypatch.setenv("CPS_FAST_BUILD_EXT", "auto")
    monkeypatch.setenv("CPS_FAST_PREBUILT", "x.so")
    with pytest.raises(RuntimeError, match=r"CPS_FAST_PREBUILT asks for the extension"):
        setup_py._extensions()


def test_with_torch_the_build_compiles_the_extension_unless_switched_off(setup_py, monkeypatch, capsys):
    """`pip install --no-build-isolation -e .` after torch (the README, CI) compiles cps_fast._C ahead
    of time, from the one recipe that cps_fast.build compiles from too."""
    (ext,), cmdclass = setup_py._extensions()
    assert ext.name == "cps_fast._C" and ext.sources == setup_py._recipe(torch)["cpp"] and "build_ext" in cmdclass
    assert setup_py._recipe(torch) == build.recipe(torch, "csrc")
    monkeypatch.setenv("CPS_FAST_BUILD_EXT", "0")
    assert setup_py._extensions() == ([], {})
    assert "CPS_FAST_BUILD_EXT=0: not compiling cps_fast._C" in capsys.readouterr().err
    monkeypatch.setenv("CPS_FAST_PREBUILT", "x.so")
    with pytest.raises(SystemExit, match="CPS_FAST_PREBUILT installs an extension, CPS_FAST_BUILD_EXT=0 asks for none"):
        setup_py._extensions()
    monkeypatch.setenv("CPS_FAST_BUILD_EXT", "yes")
    with pytest.raises(SystemExit, match=r"CPS_FAST_BUILD_EXT='yes': expected 1 .*, 0 .* or auto"):
        setup_py._extensions()


def test_a_pure_python_wheel_carries_the_sources_and_runs_without_the_extension(tmp_path):
    """The wheel a build without the extension makes (here with CPS_FAST_BUILD_EXT=0 and this
    environment's setuptools, offline; pip's isolated build takes the same branch): pure Python,
    with the Triton kernels and csrc/ inside; installed, the torch and triton backends run and
    the extension's backends say how to get them."""
    tree = tmp_path / "tree"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    for folder in ("cps_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, CPS_FAST_BUILD_EXT="0", PIP_NO_INDEX="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(tree)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == "cps_fast-0.1.0-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert {f"cps_fast/csrc/{p.name}" for p in (ROOT / "csrc").iterdir()} <= set(names)
    assert "cps_fast/kernels/cps_loss.py" in names and "cps_fast/build.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the child sees this environment's site-packages (torch, triton); an editable install of a
    # checkout there would lend the wheel its cps_fast._C through its import finder: not that one
    script = f"""
import logging, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
import torch, cps_fast
from cps_fast import backends, build
assert cps_fast.__file__.startswith({str(site)!r}), cps_fast.__file__
assert str(build.source_dir()) == {str(site / "cps_fast" / "csrc")!r}, build.source_dir()
print("reason:", backends.extension_import_error())
a, b = torch.randn(2, 5, 3, 4, requires_grad=True), torch.randn(2, 5, 3, 4, requires_grad=True)
t = torch.randint(0, 5, (2, 3, 4))
ref = cps_fast.cps_loss(a, b, t, backend="torch")
assert torch.allclose(cps_fast.cps_loss(a, b, t, backend="triton"), ref)
assert torch.allclose(cps_fast.cps_loss(a, b, t), ref)
try:
    cps_fast.cps_loss(a, b, t, backend="cpu")
except cps_fast.BackendUnavailable as exc:
    print("explicit:", exc)
"""
    env = dict(os.environ, PYTHONPATH=str(site), CPS_FAST_CACHE=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    env.pop("CPS_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    reason = lines[0].removeprefix("reason: ")
    assert reason.startswith("the extension cps_fast._C is not built (No module named 'cps_fast._C')")
    assert "`python -m cps_fast.build`" in reason and str(tmp_path / "cache") in reason
    assert [line for line in lines if "backend for" in line] == [
        f"cps_fast: cps_loss uses the torch backend for cpu tensors (cpu: {reason})"]
    assert f"explicit: cps_loss: backend='cpu' cannot run on cpu tensors: {reason}" in lines
    assert not (tmp_path / "cache").exists()  # nothing compiled, nothing cached


# ----------------------------------------------------------------------------- cps_fast.build


@pytest.mark.skipif(backends.extension() is None or build.current().origin.startswith("cache"),
                    reason="needs cps_fast._C installed")
def test_an_installed_extension_is_used_and_nothing_compiles(tmp_path, never_compile):
    import cps_fast._C

    found = build.load(jit=True, cache=tmp_path, register=False)
    assert found.module is cps_fast._C and found.error is None
    assert found.origin == f"installed: {cps_fast._C.__file__}"
    assert backends.extension() is cps_fast._C and backends.extension_import_error() is None
    assert not list(tmp_path.iterdir())


def test_the_cache_folder_is_keyed_by_torch_python_sources_and_flags(sources, tmp_path, monkeypatch):
    first = build.plan(tmp_path, sources)
    assert first == build.plan(tmp_path, sources)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert first.directory.parent == tmp_path / "ext"
    assert first.directory.name.startswith(f"torch{torch.__version__}-{py}-") and len(first.directory.name.rsplit("-", 1)[1]) == 16
    seen = {first.directory}
    monkeypatch.setenv("CPS_FAST_PORTABLE", "1")  # other flags
    seen.add(build.plan(tmp_path, sources).directory)
    monkeypatch.delenv("CPS_FAST_PORTABLE")
    (sources / "cps_loss.h").write_text((sources / "cps_loss.h").read_text() + "\n// changed\n")
    seen.add(build.plan(tmp_path, sources).directory)
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    seen.add(build.plan(tmp_path, sources).directory)
    assert len(seen) == 4


def test_the_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert build.cache_root() == tmp_path / "home" / ".cache" / "cps_fast"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "cps_fast"
    monkeypatch.setenv("CPS_FAST_CACHE", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"


def test_without_the_switch_a_missing_extension_is_one_line_and_nothing_compiles(
        sources, tmp_path, monkeypatch, no_installed_extension, never_compile):
    found = build.load(cache=tmp_path, sources=sources, register=False)  # CPS_FAST_JIT unset
    assert found.module is None and "\n" not in found.error
    assert found.error.startswith("the extension cps_fast._C is not built (import of cps_fast._C halted")
    assert f"`python -m cps_fast.build` (cached in {tmp_path / 'ext'})" in found.error
    assert "CPS_FAST_JIT=1 to compile it on first use" in found.error
    monkeypatch.setenv("CPS_FAST_JIT", "yes")
    assert "$CPS_FAST_JIT='yes': expected 0 (never compile on first use) or 1" in build.load(cache=tmp_path).error
    assert not tmp_path.joinpath("ext").exists()


def test_a_finished_build_in_the_cache_loads_without_a_compiler(
        sources, tmp_path, monkeypatch, no_installed_extension, never_compile):
    """What `python -m cps_fast.build` or a first use left in the cache: loaded as it is, in every
    later process, even where no compiler is (here: the installed extension's file, standing in)."""
    installed = Path(build.current().module.__file__) if build.current().module is not None else None
    if installed is None:
        pytest.skip("needs a built cps_fast._C to stand in for a cached build")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    b = build.plan(tmp_path, sources)
    b.directory.mkdir(parents=True)
    shutil.copy(installed, b.library)
    assert not build.load(jit=False, cache=tmp_path, sources=sources, register=False).module  # no stamp yet
    b.stamp.write_text(json.dumps({"identity": b.identity, "with_cuda": b.with_cuda}))
    found = build.load(jit=True, cache=tmp_path, sources=sources, register=False)
    assert found.error is None and found.origin == f"cache: {b.library}"
    assert found.module.__name__ == "cps_fast._C" and hasattr(found.module, "cps_loss_forward")
    assert sys.modules["cps_fast._C"] is None  # register=False left the import system alone
    b.stamp.write_text(json.dumps({"identity": dict(b.identity, torch="2.0.0"), "with_cuda": b.with_cuda}))
    assert build.load(jit=False, cache=tmp_path, sources=sources, register=False).module is None


def test_no_compiler_is_one_logged_line_and_no_build(sources, tmp_path, monkeypatch, caplog,
                                                      no_installed_extension, never_compile):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="cps_fast"):
        found = build.load(jit=True, cache=tmp_path, sources=sources, register=False)
    assert found.module is None
    assert found.error.endswith(f"CPS_FAST_JIT=1 cannot compile it here: no C++ compiler: "
                                f"CXX='{tmp_path / 'no-such-compiler'}' is not found")
    assert [r.getMessage() for r in caplog.records] == [f"cps_fast: {found.error}"]


def test_a_failed_compile_is_one_line_with_its_log_and_is_not_retried_on_use(
        sources, tmp_path, monkeypatch, caplog, no_installed_extension):
    """A compiler that fails (a script standing in for one with a broken toolchain): the reason is
    the compiler's error line and the log's path; the next process does not start the same failing
    build again (`python -m cps_fast.build` does)."""
    cxx = tmp_path / "bin" / "c++"
    cxx.parent.mkdir()
    cxx.write_text('#!/bin/sh\ncase "$1" in -v|--version) echo "gcc version 12.2.0"; exit 0;; esac\n'
                   'echo "c++: error: this toolchain is broken" >&2\nexit 1\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    with caplog.at_level(logging.INFO, logger="cps_fast"):
        found = build.load(jit=True, cache=tmp_path, sources=sources, register=False)
    b = build.plan(tmp_path, sources)
    assert found.module is None and "\n" not in found.error
    assert found.error.endswith(f"and compiling it failed: c++: error: this toolchain is broken (log: {b.log})")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"cps_fast: compiling the extension cps_fast._C (CPS_FAST_JIT=1, first use; "
                                  f"{b.kernels}) into {b.directory}")
    assert messages[1:] == [f"cps_fast: {found.error}"]
    assert b.failure.is_file() and not b.stamp.exists()

    def refuse(b):
        raise AssertionError("compiled again")

    monkeypatch.setattr(build, "compile_extension", refuse)
    again = build.load(jit=True, cache=tmp_path, sources=sources, register=False)
    assert "compiling it failed before: c++: error: this toolchain is broken" in again.error
    assert again.error.endswith("`python -m cps_fast.build` tries again")


@pytest.fixture
def fresh_backend_caches():
    """backends.extension() and extension_import_error() asked again, before and after the test."""
    def clear():
        for f in (backends.extension, backends.extension_import_error):
            getattr(f, "cache_clear", lambda: None)()

    clear()
    yield
    clear()


def test_backends_fall_back_or_raise_with_the_extensions_reason(monkeypatch, fresh_backend_caches):
    """The automatic choice on CPU tensors falls back to torch; backend="cpu" raises, with the reason."""
    reason = "the extension cps_fast._C is not built (test), and compiling it failed: c++: error: x (log: L)"
    monkeypatch.setattr(build, "current", lambda: build.Extension(None, reason, ""))
    assert backends.extension() is None and backends.why_unavailable("cpu", "cpu") == reason
    assert backends.select_backend("cpu") == "torch"
    with pytest.raises(backends.BackendUnavailable, match=r"backend='cpu' cannot run on cpu tensors: .*c\+\+: error: x"):
        backends.select_backend("cpu", "cpu")


def test_python_m_cps_fast_build_status_compiles_nothing(capsys, tmp_path, no_installed_extension, never_compile):
    assert build.main(["--status", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("cps_fast._C: unavailable: the extension cps_fast._C is not built")
    assert "\n" not in out and not list(tmp_path.iterdir())


def test_python_m_cps_fast_build_without_a_compiler_says_so(capsys, tmp_path, monkeypatch, no_installed_extension):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert build.main(["--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"cps_fast._C: cannot be compiled here: no C++ compiler: CXX='{tmp_path / 'no-such-compiler'}' is not found"
