"""The offline bundle a GPU node installs from (.gpu-bundle/), and the checks that it is whole.

A GPU node has Python, torch, transformers and PEFT (and what they need), no network, no
Rust. gpu/prepare.sh downloads, on a machine with network, what the node lacks: the pissa-rs
wheel, bitsandbytes, pytest and hypothesis with every dependency pip resolves for them, less
what the node's own stack already brings. The node then installs with
`pip install --no-index --no-deps`: nothing is resolved there, so a missing wheel would
surface only when a test imports it; these commands find it before:

    bundle.py stack ROOT...            the installed distributions ROOT... need, transitively
    bundle.py prune DIR NAME...        remove from DIR the wheels of distributions NAME...
    bundle.py manifest DIR ...         write DIR/bundle.json (what to install, what the node must have)
    bundle.py check DIR                every bundled wheel's requirements, for each node Python the
                                       bundle is for, met by the bundle or the node's stack
    bundle.py install-names DIR        the distributions the node installs, one a line
    bundle.py pip-wheel DIR            the bundled pip wheel (to bootstrap a venv made without pip)
    bundle.py view VENV DIR            (rehearsal) make VENV see only the node's stack of this
                                       interpreter's site-packages, as a node's venv sees its system's
    bundle.py pipcheck DIR             `pip check` in this environment, failing only on the bundle's

Standard library only, except `packaging` (which transformers needs: every node has it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

MANIFEST = "bundle.json"


def normalize(name: str) -> str:
    """PEP 503's form of a distribution name: 'Sorted_Containers' -> 'sorted-containers'."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- wheels -------------------------------------------------------------------------------

def wheel_tags(filename: str) -> tuple[str, str, list[str], str]:
    """(normalized name, version, python tags, abi tag) of a wheel file name."""
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    name, version, py, abi = parts[0], parts[1], parts[-3], parts[-2]
    return normalize(name), version, py.split("."), abi


def wheel_supports(filename: str, python: str) -> bool:
    """Whether a wheel installs on CPython `python` ('3.12'): py3 tags on any, cpXY-abi3 on
    XY and later, cpXY on XY alone."""
    _, _, pys, abi = wheel_tags(filename)
    major, minor = (int(x) for x in python.split(".")[:2])
    for tag in pys:
        if tag in ("py3", f"py{major}"):
            return True
        found = re.fullmatch(r"cp(\d)(\d+)", tag)
        if found:
            version = (int(found[1]), int(found[2]))
            if version == (major, minor) or (abi == "abi3" and version <= (major, minor)):
                return True
    return False


def wheel_requirements(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode()
    header = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("Requires-Dist:")]


def marker_env(python: str, extra: str = "") -> dict[str, str]:
    """The marker environment of a Linux x86_64 CPython `python` ('3.12')."""
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": "x86_64", "extra": extra}


def applies(requirement, python: str, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate(marker_env(python, extra))


# -- the node's stack ---------------------------------------------------------------------

def stack(roots: list[str]) -> list[str]:
    """The installed distributions `roots` need, themselves included, transitively (the
    running interpreter's metadata; markers evaluated for it, extras not followed)."""
    from packaging.requirements import Requirement

    seen: dict[str, None] = {}
    todo = [normalize(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"bundle.py: {name} is not installed in {sys.executable}: run with an interpreter that "
                             "has pissa-rs's dependencies (the project's venv)") from None
        seen[name] = None
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return sorted(seen)


def view(venv: Path, roots: list[str]) -> Path:
    """Make `venv` (made without the system's site-packages) see, from this interpreter's
    site-packages, the distributions `roots` need and nothing else: symbolic links to their
    files in VENV/node-view and a .pth naming it. A rehearsal of a node whose system Python
    has that stack, run from an interpreter that has much more (pytest, pygments, ...), which
    would hide a wheel the bundle lacks."""
    target = venv / "node-view"
    target.mkdir(parents=True, exist_ok=True)
    linked = 0
    for name in stack(roots):
        dist = metadata.distribution(name)
        base = Path(dist.locate_file("")).resolve()
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            src, dst = base / top, target / top
            if src.exists() and not dst.exists() and not top.endswith(".pth"):
                dst.symlink_to(src)
                linked += 1
    site = venv_site_packages(venv)
    (site / "node-view.pth").write_text(f"{target.resolve()}\n")
    print(f"node view: {linked} entries of {len(stack(roots))} distributions -> {site / 'node-view.pth'}")
    return target


def venv_site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"bundle.py: no site-packages under {venv}")
    return found[0]


# -- the bundle ---------------------------------------------------------------------------

def prune(folder: Path, names: list[str]) -> list[str]:
    drop = {normalize(n) for n in names}
    removed = []
    for wheel in sorted(folder.glob("*.whl")):
        if wheel_tags(wheel.name)[0] in drop:
            wheel.unlink()
            removed.append(wheel.name)
    return removed


def write_manifest(folder: Path, pythons: list[str], provides: list[str], node_stack: list[str]) -> dict:
    wheels = sorted(w.name for w in folder.glob("*.whl"))
    manifest = {
        "node_pythons": pythons,  # the node Pythons the bundle has wheels for
        # pip install --no-index --no-deps these (pip itself only bootstraps a venv made without it)
        "install": sorted({wheel_tags(w)[0] for w in wheels} - {"pip"}),
        "pip": next((w for w in wheels if wheel_tags(w)[0] == "pip"), None),
        "node_provides": sorted(normalize(n) for n in provides),  # pissa-rs needs them of the node
        "node_stack": node_stack,  # what they brought on the machine that made the bundle (not bundled)
        "wheels": {w: (folder / w).stat().st_size for w in wheels},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise SystemExit(f"bundle.py: no {path}: make the bundle first (bash gpu/prepare.sh)")
    return json.loads(path.read_text())


def missing(folder: Path) -> list[str]:
    """Each requirement of a bundled wheel that neither the bundle nor the node's stack meets,
    for each node Python of the manifest: '[3.12] pytest 9.2.0 needs pygments'."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    manifest = read_manifest(folder)
    node = set(manifest["node_stack"]) | set(manifest["node_provides"])
    problems = []
    for python in manifest["node_pythons"]:
        wheels = [w for w in sorted(folder.glob("*.whl")) if wheel_supports(w.name, python)]
        have: dict[str, list[str]] = {}
        for w in wheels:
            name, version, _, _ = wheel_tags(w.name)
            have.setdefault(name, []).append(version)
        for name in manifest["install"]:
            if name not in have:
                problems.append(f"[{python}] {name}: no wheel for this Python")
        for w in wheels:
            name, version, _, _ = wheel_tags(w.name)
            for line in wheel_requirements(w):
                req = Requirement(line)
                if not applies(req, python):
                    continue
                dep = normalize(req.name)
                if dep in node:
                    continue  # the node's; its version is pip check's on the node
                if not any(Version(v) in req.specifier for v in have.get(dep, [])):
                    found = f" (bundled: {', '.join(have[dep])})" if dep in have else ""
                    problems.append(f"[{python}] {name} {version} needs {line}: not in the bundle{found} "
                                    "nor the node's stack")
    return problems


def ours_broken(line: str, ours: set[str]) -> bool:
    """Whether a line of `pip check` is the bundle's doing: a bundled distribution lacks a
    requirement ('pytest 9.2.0 requires pluggy, which is not installed.'), or a bundled wheel
    shadows what the node's stack needs ('transformers 5.0 has requirement packaging<25, but
    you have packaging 26.4.'). The node's own quarrels are its business."""
    words = line.split()
    if words and normalize(words[0]) in ours:
        return True
    found = re.search(r", but you have (\S+) ", line)
    return bool(found and normalize(found[1]) in ours)


def pipcheck(folder: Path) -> list[str]:
    """`pip check` here; the lines that are the bundle's doing (ours_broken) are returned, the
    others said as information."""
    ours = set(read_manifest(folder)["install"])
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("No broken")]
    bad = [line for line in lines if ours_broken(line, ours)]
    for line in lines:
        print(("BUNDLE: " if line in bad else "node (not ours): ") + line)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stack").add_argument("roots", nargs="+")
    p = sub.add_parser("prune")
    p.add_argument("folder", type=Path)
    p.add_argument("names", nargs="*")
    p = sub.add_parser("manifest")
    p.add_argument("folder", type=Path)
    p.add_argument("--pythons", nargs="+", required=True)
    p.add_argument("--provides", nargs="+", required=True)
    p.add_argument("--stack", nargs="*", default=[])
    for cmd in ("check", "install-names", "pip-wheel", "pipcheck"):
        sub.add_parser(cmd).add_argument("folder", type=Path)
    p = sub.add_parser("view")
    p.add_argument("venv", type=Path)
    p.add_argument("folder", type=Path)
    p = sub.add_parser("is-venv")  # exit 0 when this interpreter is a virtual environment's
    args = ap.parse_args(argv)

    if args.cmd == "stack":
        print("\n".join(stack(args.roots)))
    elif args.cmd == "prune":
        for name in prune(args.folder, args.names):
            print(f"not bundled (the node's stack has it): {name}")
    elif args.cmd == "manifest":
        m = write_manifest(args.folder, args.pythons, args.provides, args.stack)
        print(f"{args.folder / MANIFEST}: install {' '.join(m['install'])} (Python {', '.join(m['node_pythons'])})")
    elif args.cmd == "check":
        problems = missing(args.folder)
        for line in problems:
            print(f"MISSING {line}")
        if problems:
            return 1
        print(f"{args.folder}: every requirement of every wheel met by the bundle or the node's stack")
    elif args.cmd == "install-names":
        print("\n".join(read_manifest(args.folder)["install"]))
    elif args.cmd == "pip-wheel":
        wheel = read_manifest(args.folder).get("pip")
        if not wheel:
            return 1
        print(args.folder / wheel)
    elif args.cmd == "view":
        view(args.venv, read_manifest(args.folder)["node_provides"])
    elif args.cmd == "pipcheck":
        bad = pipcheck(args.folder)
        if bad:
            print(f"pip check: {len(bad)} requirement(s) of bundled wheels not met", file=sys.stderr)
            return 1
        print("pip check: every bundled wheel's requirements met")
    elif args.cmd == "is-venv":
        return 0 if sys.prefix != sys.base_prefix else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
