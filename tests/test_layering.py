"""The data package's layering: no import cycles (function-level imports included), one DataError,
one ConfigError, and the loaders' shared keywords declared once."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import cps_fast

PACKAGE_DIR = Path(cps_fast.__file__).resolve().parent


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` of every module under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any level (module top, functions, classes).

    ``from .x import name`` counts as importing ``x``, or ``x.name`` where that is a module; the
    parent packages that Python imports first are not counted (every submodule would otherwise
    be in a cycle with its package's ``__init__``)."""
    files = module_files(package_dir)
    top = package_dir.name
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in files.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name == top or a.name.startswith(top + "."))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base != top and not base.startswith(top + "."):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("from ..b import g\n\ndef f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.sub.a\n")
    (pkg / "b.py").write_text("def g():\n    from pkg.sub.a import f\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.a"}
    assert graph["pkg.sub.a"] == {"pkg.b", "pkg.sub.c"}
    assert cycles(graph) == [["pkg.b", "pkg.sub.a", "pkg.sub.c"]]


def test_the_data_package_has_no_import_cycles():
    """No cycle passes through a module of cps_fast.data, directly (datasets -> splits -> datasets)
    or through another part of cps_fast (splits -> config -> data.paper_lists -> ...)."""
    graph = import_graph()
    assert "cps_fast.data.datasets" in graph and "cps_fast.data.splits" in graph
    bad = [c for c in cycles(graph) if any(m == "cps_fast.data" or m.startswith("cps_fast.data.") for m in c)]
    assert not bad, f"import cycles through cps_fast.data: {bad}"


def test_the_data_package_imports_only_errors_from_the_rest_of_cps_fast():
    """cps_fast.data sits below config, train and eval: of the rest of the package it imports only
    the leaf cps_fast.errors, so no cycle can come back into it through them."""
    graph = import_graph()
    outside = {(m, d) for m, deps in graph.items() if m == "cps_fast.data" or m.startswith("cps_fast.data.")
               for d in deps if not (d == "cps_fast.data" or d.startswith("cps_fast.data.")) and d != "cps_fast.errors"}
    assert not outside, f"cps_fast.data imports these parts of cps_fast: {sorted(outside)}"


def test_the_shared_leaf_imports_nothing_from_the_data_package():
    graph = import_graph()
    assert graph["cps_fast.data.common"] <= {"cps_fast.errors"}


def test_one_error_class_each_wherever_it_is_imported_from():
    import cps_fast.config
    import cps_fast.data
    import cps_fast.data.common
    import cps_fast.data.datasets
    import cps_fast.errors

    assert cps_fast.data.datasets.DataError is cps_fast.data.DataError is cps_fast.data.common.DataError
    assert cps_fast.config.ConfigError is cps_fast.errors.ConfigError
    for cls in (cps_fast.data.DataError, cps_fast.config.ConfigError):
        assert issubclass(cls, cps_fast.errors.UserError) and issubclass(cls, ValueError)


def test_synthetic_and_file_datasets_share_one_getitem():
    from cps_fast.data.common import BaseDataset
    from cps_fast.data.datasets import SegDataset
    from cps_fast.data.synthetic import SyntheticDataset

    for cls in (SegDataset, SyntheticDataset):
        assert issubclass(cls, BaseDataset) and cls.__getitem__ is BaseDataset.__getitem__


def test_the_trainer_takes_subset_from_the_data_package():
    import cps_fast.data
    import cps_fast.train.trainer

    assert cps_fast.train.trainer.Subset is cps_fast.data.Subset


def test_the_loaders_shared_keywords_are_declared_once():
    import dataclasses

    from cps_fast.data import labeled_loader, unlabeled_loader
    from cps_fast.data.loaders import LoaderOptions

    shared = [f.name for f in dataclasses.fields(LoaderOptions)]
    lab = list(inspect.signature(labeled_loader).parameters)
    unl = list(inspect.signature(unlabeled_loader).parameters)
    assert lab == ["dataset", *shared, "label_dtype", "check_labels"]
    assert unl == ["dataset", *shared, "stream"]
    for fn in (labeled_loader, unlabeled_loader):
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) got an unexpected keyword argument 'batchsize'.*"
                                            r"did you mean 'batch_size'"):
            fn([], batchsize=2, crop_size=16)
        with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) missing required keyword argument 'crop_size'"):
            fn([], batch_size=2)
    with pytest.raises(TypeError, match=r"unlabeled_loader\(\) got an unexpected keyword argument 'label_dtype'"):
        unlabeled_loader([], batch_size=2, crop_size=16, label_dtype=None)
