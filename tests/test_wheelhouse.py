"""scripts/wheelhouse.py: build a wheelhouse from the package index, then install from it with no index.

Real pip against the real index, on a small subset of the dependencies (hydra-core's closure, which has a
source-only package, antlr4-python3-runtime, and a compiled one, PyYAML). Skipped when the index cannot be
reached.
"""

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tomllib
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wheelhouse.py"


def index_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pyyaml/", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not index_reachable(), reason="PyPI (https://pypi.org) is not reachable")


def wheelhouse(*args: str | Path, python: str | Path = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def wheels(folder: Path) -> dict[str, set[Tag]]:
    """{canonical project name: its wheel's tags} for the wheels in `folder`."""
    out = {}
    for path in folder.glob("*.whl"):
        name, _, _, tags = parse_wheel_filename(path.name)
        out[canonicalize_name(name)] = set(tags)
    return out


def test_build_then_install_offline_into_fresh_venv(tmp_path):
    house = tmp_path / "wheelhouse"
    r = wheelhouse("build", "--dest", house, "hydra-core==1.3.*")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = wheels(house)
    # The project (no deps), hydra-core's whole closure, and the build backend, one wheel each.
    expected = {"flashattn-repro", "hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml", "packaging"}
    assert expected <= set(found), sorted(found)
    assert "setuptools" in found
    assert not list(house.glob("*.tar.gz")), "source distributions must be built into wheels"
    assert "torch" not in found  # only what was asked for

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    py = venv / "bin" / "python"
    # No index anywhere: pip's configuration and environment variables are ignored by the install command,
    # and the wheelhouse is the only source.
    r = wheelhouse("install", "--wheelhouse", house, "hydra-core", python=py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = wheelhouse("install", "--wheelhouse", house, "--no-deps", "flashattn-repro", python=py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # The installed packages work: an interpolation goes through omegaconf's ANTLR grammar and PyYAML.
    check = """
import importlib.metadata, omegaconf, hydra
c = omegaconf.OmegaConf.create("a: 2\\nb: ${a}")
print(c.b, importlib.metadata.version("flashattn-repro"))
print(next(f for f in importlib.metadata.files("flashattn-repro") if f.name == "reference.py").locate())
"""
    r = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    first, origin = r.stdout.splitlines()
    assert first == f"2 {tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"
    assert Path(origin).resolve().is_relative_to(venv.resolve())  # the venv's copy, not the checkout's


def test_build_for_another_platform_and_python(tmp_path):
    house = tmp_path / "wheelhouse"
    target = ["--platform", "manylinux_2_28_aarch64", "--python-version", "3.12"]
    r = wheelhouse("build", "--dest", house, *target, "hydra-core")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = wheels(house)
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml", "packaging"} <= set(found)
    # The compiled package is the target's build, not this machine's.
    assert all(t.interpreter == "cp312" and "aarch64" in t.platform for t in found["pyyaml"]), found["pyyaml"]
    # The source-only package was built here into a pure-Python wheel, which serves the target too.
    assert Tag("py3", "none", "any") in found["antlr4-python3-runtime"]


def test_no_torch_leaves_out_torch_and_cuda_wheels(tmp_path):
    house = tmp_path / "wheelhouse"
    r = wheelhouse("build", "--dest", house, "--no-torch", "lightning-utilities", "torchmetrics")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = set(wheels(house))
    assert {"torchmetrics", "lightning-utilities", "numpy"} <= found  # torchmetrics' other dependencies stay
    assert not {n for n in found if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))}, found
    assert "left out (--no-torch): " in r.stdout and "torch" in r.stdout.split("left out (--no-torch): ")[1]

    # Installing the project from it needs a torch from elsewhere: a clear error where there is none.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    r = wheelhouse("install", "--wheelhouse", house, python=venv / "bin" / "python")
    assert r.returncode != 0
    assert "no torch wheel" in r.stderr and "--no-torch" in r.stderr


def test_install_without_wheelhouse_is_a_clear_error(tmp_path):
    r = wheelhouse("install", "--wheelhouse", tmp_path / "missing")
    assert r.returncode != 0
    assert "no wheels in" in r.stderr and "wheelhouse.py build" in r.stderr
