"""Build an offline wheelhouse of the project's dependencies, and install from it without an index.

Compute nodes of many clusters have no internet. Build the wheelhouse once where PyPI is reachable, copy
the folder next to the checkout on the cluster, and install from it there:

    # on a machine with internet, for x86_64 Linux GPU nodes running Python 3.12:
    python scripts/wheelhouse.py build --platform manylinux_2_28_x86_64 --python-version 3.12
    # clusters usually provide their own torch: leave out torch, triton and the nvidia-* CUDA wheels
    python scripts/wheelhouse.py build --no-torch --platform manylinux_2_28_x86_64 --python-version 3.12
    # on the cluster, inside the environment that should get the packages:
    python scripts/wheelhouse.py install              # the project and all its dependencies
    python scripts/wheelhouse.py install --editable   # the same, the checkout installed in editable mode

`build` resolves the requirements with pip (`pip install --dry-run --report`), so the wheelhouse holds one
wheel per package of one consistent set, plus the project's own wheel and its build backend (setuptools).
Packages that PyPI has only as source (e.g. antlr4-python3-runtime, needed by hydra-core) are built into
wheels on this machine; pure-Python ones then serve any target platform.
Without --platform/--python-version the wheelhouse targets this machine's platform and Python.

`install` runs `pip install --no-index --find-links WHEELHOUSE` (pip's config and environment variables
ignored), so nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
# What --no-torch leaves out: torch and the packages that only torch's own wheels pull in.
TORCH_NAMES = {"torch", "triton", "pytorch-triton"}
TORCH_PREFIXES = ("nvidia-", "cuda-")


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'PyYAML' -> 'pyyaml', 'typing_extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_torch_package(name: str) -> bool:
    name = canonical(name)
    return name in TORCH_NAMES or name.startswith(TORCH_PREFIXES)


def project_info() -> tuple[str, list[str]]:
    """(project name, build-system requirements) from pyproject.toml."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["name"], pyproject["build-system"]["requires"]


def copy_project(tmp: Path) -> Path:
    """Copy what the project's wheel is built from (pyproject.toml, README, the packages) into `tmp`/src."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = tmp / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*.")
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"wheelhouse: command failed with exit code {result.returncode}: {' '.join(cmd)}")


def expand_platform(platform: str) -> list[str]:
    """A glibc-versioned platform and the older ones it runs: 'manylinux_2_28_x86_64' -> 2_28 ... 2_17, 2014.

    pip takes each --platform literally, yet most wheels are tagged for an older glibc than the target's.
    """
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    return [f"manylinux_2_{v}_{arch}" for v in range(glibc, 16, -1)] + [f"manylinux2014_{arch}"]


def target_args(args: argparse.Namespace) -> list[str]:
    """pip options that select the target interpreter/platform (empty: this machine)."""
    out = []
    for platform in args.platform or []:
        for p in expand_platform(platform):
            out += ["--platform", p]
    if args.python_version:
        out += ["--python-version", args.python_version]
    if args.implementation:
        out += ["--implementation", args.implementation]
    for abi in args.abi or []:
        out += ["--abi", abi]
    return out


def resolve(reqs: list[str], target: list[str], dest: Path, tmp: Path) -> list[dict]:
    """Resolve `reqs` with pip (nothing installed) and return the report's "install" entries.

    With a foreign target pip accepts wheels only (--only-binary=:all:); wheels already in `dest`
    (those built from source distributions) are found through --find-links.
    """
    report = tmp / "report.json"
    cmd = [*PIP, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    if target:
        cmd += ["--only-binary=:all:", *target, "--target", str(tmp / "target"), "--find-links", str(dest)]
    run(cmd + reqs)
    return json.loads(report.read_text())["install"]


def pin(item: dict) -> str:
    return f"{item['metadata']['name']}=={item['metadata']['version']}"


def build(args: argparse.Namespace) -> None:
    dest = Path(args.dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    name, build_requires = project_info()
    target = target_args(args)
    keep = lambda item: not (args.no_torch and is_torch_package(item["metadata"]["name"]))
    # The project is always built from a clean copy, so that no build/ or *.egg-info is left in the
    # checkout and no stale build/lib file gets into its wheel.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = copy_project(tmp)
        extras = f"[{args.extras}]" if args.extras else ""
        # The requirement set: the project's dependencies or the given requirements, and its build backend.
        reqs = [*build_requires, *(args.requirements or [f"{project}{extras}"])]

        # 1. Resolve for this machine; build the packages that come as source only into wheels here.
        items = [item for item in resolve(reqs, [], dest, tmp) if "dir_info" not in item["download_info"]]
        sdists = [pin(i) for i in items if keep(i) and not i["download_info"]["url"].endswith(".whl")]
        if sdists:
            run([*PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *sdists])
        # 2. Resolve again for the target platform/Python, if it is not this machine.
        if target:
            items = [i for i in resolve(reqs, target, dest, tmp) if "dir_info" not in i["download_info"]]
        # 3. Fetch one wheel per resolved package, then build the project's own (pure Python) wheel.
        pins = [pin(i) for i in items if keep(i)]
        fetch = [*PIP, "download", "--quiet", "--no-deps", "--only-binary=:all:", *target]
        run([*fetch, "--find-links", str(dest), "--dest", str(dest), *pins])
        run([*PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(project)])

    skipped = sorted(i["metadata"]["name"] for i in items if not keep(i))
    print(f"wheelhouse: {len(list(dest.glob('*.whl')))} wheels in {dest} ({name} and {len(pins)} packages)")
    if skipped:
        print(f"wheelhouse: left out (--no-torch): {', '.join(skipped)}")


def install(args: argparse.Namespace) -> None:
    wheelhouse = Path(args.wheelhouse).resolve()
    if not wheelhouse.is_dir() or not any(wheelhouse.glob("*.whl")):
        sys.exit(f"wheelhouse: no wheels in {wheelhouse}; build it with `python scripts/wheelhouse.py build`")
    name, _ = project_info()
    extras = f"[{args.extras}]" if args.extras else ""
    if args.requirements:
        reqs = args.requirements
    elif args.editable:
        reqs = ["--editable", f"{REPO}{extras}"]
    else:
        reqs = [f"{name}{extras}"]
    has_torch = any(canonical(p.name.split("-")[0]) == "torch" for p in wheelhouse.glob("*.whl"))
    if not has_torch and not args.requirements and not args.no_deps:
        probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
        if probe.returncode != 0:
            sys.exit(
                f"wheelhouse: {wheelhouse} has no torch wheel (built with --no-torch) and {sys.executable} "
                "cannot import torch; load the cluster's torch (module load / its venv) first, "
                "or rebuild the wheelhouse without --no-torch"
            )
    cmd = [*PIP, "install", "--isolated", "--no-index", "--find-links", str(wheelhouse)]
    if args.no_deps:
        cmd.append("--no-deps")
    run(cmd + reqs)


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="download/build wheels into a folder")
    p.add_argument("requirements", nargs="*", help="what to resolve instead of the project")
    p.add_argument("--dest", default=str(REPO / "wheelhouse"), help="output folder (default: ./wheelhouse)")
    p.add_argument("--extras", default="", help="project extras to include, e.g. 'dev'")
    p.add_argument("--no-torch", action="store_true", help="leave out torch, triton, nvidia-*, cuda-*")
    p.add_argument("--platform", action="append", help="target platform tag, e.g. manylinux_2_28_x86_64")
    p.add_argument("--python-version", help="target Python version, e.g. 3.12")
    p.add_argument("--implementation", help="target Python implementation, e.g. cp")
    p.add_argument("--abi", action="append", help="target ABI tag, e.g. cp312")
    p.set_defaults(func=build)

    p = sub.add_parser("install", help="install from a wheelhouse, offline")
    p.add_argument("requirements", nargs="*", help="what to install (default: the project)")
    p.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"), help="default: ./wheelhouse")
    p.add_argument("--extras", default="", help="project extras to install, e.g. 'dev'")
    p.add_argument("--editable", action="store_true", help="install this checkout in editable mode")
    p.add_argument("--no-deps", action="store_true", help="install only the named packages")
    p.set_defaults(func=install)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
