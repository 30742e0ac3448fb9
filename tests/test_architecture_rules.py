"""The architecture as docs/design.md states it, checked: the engine never imports
transformers or PEFT (a unit runs in a worker that never builds a model), and the module
map names every module of the package, one sentence each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "python" / "pissa_rs"


def test_the_engine_imports_neither_transformers_nor_peft():
    code = ("import sys, pissa_rs.engine.run, pissa_rs.engine.commit, pissa_rs.decompose; "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_module_map_names_every_module():
    design = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    table = design[design.index("## Module map"):]
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" or p.parent == PACKAGE)
    missing = [m for m in modules if f"| `{m}` |" not in table]
    assert not missing, f"docs/design.md's module map lacks {missing}"


def test_only_the_public_entry_points_import_the_driver():
    """decompose.py (the driver) is imported by the package's front doors only: another
    module that needs what it knows (where outputs go, say) gets it from the module that owns it."""
    import ast

    importers = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            level = getattr(node, "level", 0)
            if any(n == "decompose" and level == 1 and path.parent == PACKAGE or n.endswith("pissa_rs.decompose")
                   or (n == "decompose" and level == 2) for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(set(importers)) == ["__init__.py", "cli.py"], importers


def test_methods_are_reached_through_the_registry_only():
    """Each method lives in methods/<name>.py; no module outside methods/ imports one by its
    module, and the engine never names one: it runs whatever options.init_method is."""
    import ast

    from pissa_rs.methods import METHODS, method_names

    modules = {type(m).__module__.rsplit(".", 1)[1] for m in METHODS.values()}
    assert modules == {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base", "registry"}
    named = set(method_names()) | modules
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            ours = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("pissa_rs"))
            if ours and node.module and node.module.split(".")[-1] in named:
                offenders.append(f"{path.name} imports {node.module}")
            if ours and (node.module or "").endswith("methods"):
                offenders += [f"{path.name} imports {a.name}" for a in node.names if a.name in named]
        if path.parent.name == "engine":
            offenders += [f"{path.name} names {m!r}" for m in named if f'"{m}"' in source or f"'{m}'" in source]
    assert not offenders, offenders


def test_every_full_svd_goes_through_svd_py():
    """svd.full_svd / singular_values choose cuSOLVER's driver (gesvd, not torch's default
    gesvdj); a torch.linalg.svd call elsewhere would run with the default on a GPU."""
    import re

    calls = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py") if p.name != "svd.py"
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"torch\.(linalg\.svd|linalg\.svdvals|svd)\(", line)]
    assert not calls, f"full SVDs outside svd.py (use svd.full_svd / singular_values): {calls}"
