"""The wheel is what an admin installs: built from this tree, it holds the default model
bundles (what serving reads of them, no training files), Colin27 and the console's files;
installed (tests/test_container.py installs this wheel, as the Containerfile does, in a clean
virtual environment without torch and with Debian's mricron-data unreadable, and screens a
phantom CT through it; one clean install per run is enough: each takes minutes).

Build: `pip wheel --no-deps --no-build-isolation` on a copy of the tree (the build
backend is this environment's setuptools, so nothing is fetched for the build).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from headscreen.bundle import MANIFEST_NAME, TRAINING_ONLY_FILES
from wheel_helpers import (
    bundle_dirs,
)

pytestmark = pytest.mark.slow  # builds the wheel: `make test-fast` leaves it out

REPO = Path(__file__).resolve().parent.parent
# The layer folders; headscreen/ (the import root) links to them.
PACKAGES = ("daemon", "db", "export", "imaging", "model_training")
# 11.7 MiB when written (two bundles 8.3 MiB compressed, Colin27 3.3 MiB, code 0.4 MiB);
# room for a third bundle of the same size while a CT bundle is replaced, no more.
WHEEL_LIMIT_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of this tree (other work in the checkout is left alone)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    # What deploy/Containerfile copies into its build stage.
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "headscreen", source / "headscreen", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in (*PACKAGES, "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(base / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    print(f"\nwheel built in {time.monotonic() - started:.1f} s")
    (built,) = (base / "dist").glob("headscreen-*.whl")
    return built


def test_the_wheel_holds_what_serving_needs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    size = wheel.stat().st_size
    print(f"\n{wheel.name}: {size / 2**20:.1f} MiB, {len(sizes)} files, "
          f"{sum(sizes.values()) / 2**20:.1f} MiB installed")
    assert size < WHEEL_LIMIT_BYTES
    # Every bundle in models/: what load_bundle reads, and nothing for training.
    for bundle in bundle_dirs():
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        prefix = f"headscreen/models/{bundle.name}/"
        packaged = {name[len(prefix):] for name in sizes if name.startswith(prefix)}
        serving = set(manifest["files"]) - TRAINING_ONLY_FILES
        normative = [manifest["normative"]["file"]] if manifest.get("normative") else []
        assert {MANIFEST_NAME, manifest.get("model_file", "model.onnx"), *normative} <= packaged
        assert serving <= packaged and not packaged & TRAINING_ONLY_FILES, (bundle.name, packaged)
        print(f"  {bundle.name}: " + ", ".join(f"{n} {sizes[prefix + n] / 1e6:.2f} MB" for n in sorted(packaged)))
    # Colin27, the same bytes the source tree has, with its licence.
    with zipfile.ZipFile(wheel) as archive:
        colin = archive.read("headscreen/imaging/data/ch2.nii.gz")
        assert (hashlib.sha256(colin).digest()
                == hashlib.sha256((REPO / "imaging/data/ch2.nii.gz").read_bytes()).digest())
    assert "headscreen/imaging/data/README.md" in sizes
    # Every module and the console's files (the packages are listed in pyproject.toml).
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".html", ".js", ".css", ".toml", ".mako"} \
                    and "__pycache__" not in path.parts:
                assert f"headscreen/{path.relative_to(REPO).as_posix()}" in sizes, path
    for path in (REPO / "headscreen").glob("*.py"):
        assert f"headscreen/{path.name}" in sizes, path
    # One import root: nothing else lands in site-packages (no top-level `daemon` to clash
    # with PyPI's python-daemon, no `db`, `export`, ...).
    assert {name.split("/")[0] for name in sizes if ".dist-info/" not in name} == {"headscreen"}
