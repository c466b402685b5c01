"""The wheel is what an admin installs: built from this tree, it holds the default model
bundles (what serving reads of them, no training files), Colin27 and the console's files;
installed in a clean virtual environment without torch, and with Debian's mricron-data
made unreadable, `headscreen serve` screens a phantom CT and sends its results back.

Build: `pip wheel --no-deps --no-build-isolation` on a copy of the tree (the build
backend is this environment's setuptools, so nothing is fetched for the build). Install:
`python -m venv --without-pip`, then this environment's pip (`pip --python`) installs the
wheel and its dependencies from the index pip is configured with (the Makefile's), with
--no-compile: byte-compiling ~900 MB of dependencies would triple the time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from daemon.bundle import MANIFEST_NAME, TRAINING_ONLY_FILES
from daemon.orthanc import free_port
from serve_harness import RecordingSCP, storescu, wait_until
from wheel_helpers import (
    HIDDEN_MARK,
    InstalledDaemon,
    assert_screened,
    bundle_dirs,
    hide_debian_templates,
    install_wheel_with_host_pip,
    phantom_ct_study,
    require_dcmtk,
    venv_python,
)

pytestmark = pytest.mark.slow  # builds the wheel, installs it in a clean venv: `make test-fast` leaves it out

REPO = Path(__file__).resolve().parent.parent
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
        colin = archive.read("imaging/data/ch2.nii.gz")
        assert (hashlib.sha256(colin).digest()
                == hashlib.sha256((REPO / "imaging/data/ch2.nii.gz").read_bytes()).digest())
    assert "imaging/data/README.md" in sizes
    # Every module and the console's files (the packages are listed in pyproject.toml).
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".html", ".js", ".css", ".toml", ".mako"} \
                    and "__pycache__" not in path.parts:
                assert path.relative_to(REPO).as_posix() in sizes, path
    assert not [name for name in sizes if name.startswith(("tests/", "models/", "bench/"))]


def test_the_wheel_in_a_clean_venv_screens_a_study(wheel: Path, tmp_path: Path) -> None:
    require_dcmtk()
    venv = tmp_path / "venv"
    seconds = install_wheel_with_host_pip(wheel, venv)
    print(f"\nclean venv with the wheel and its dependencies in {seconds:.0f} s")
    site = hide_debian_templates(venv)
    # The installed code, bundles and template are the venv's own; no torch; no Debian Colin27.
    where = json.loads(venv_python(venv, (
        "import json, importlib.util, daemon, imaging.templates as t, daemon.config as c\n"
        "try:\n    open('/usr/share/mricron/templates/ch2.nii.gz', 'rb')\n    hidden = False\n"
        "except FileNotFoundError:\n    hidden = True\n"
        "print(json.dumps({'daemon': daemon.__file__, 'colin': str(t.colin27_path()), 'hidden': hidden,\n"
        "  'bundles': [str(p) for p in c.shipped_bundles()],\n"
        "  'torch': importlib.util.find_spec('torch') is not None}))\n"
    )))
    assert where["daemon"].startswith(str(site)) and where["colin"].startswith(str(site)), where
    assert where["hidden"] and not where["torch"], where
    assert sorted(Path(p).name for p in where["bundles"]) == [p.name for p in bundle_dirs()]
    assert all(p.startswith(str(site / "headscreen" / "models")) for p in where["bundles"])

    study, study_uid = phantom_ct_study(tmp_path / "study")
    destination = RecordingSCP(tmp_path / "pacs")
    web_port = free_port()
    daemon = InstalledDaemon(tmp_path / "hs", destinations=[("pacs", destination.ae_title, destination.port)],
                             web_port=web_port, venv=venv, extra="overlay_slices = 6\n")
    try:
        started = time.monotonic()
        daemon.start()
        storescu(study, daemon.port)
        wait_until(daemon.all_delivered, 240, 1.0, "results delivered by the installed serve")
        print(f"serve started, study screened and delivered in {time.monotonic() - started:.0f} s")
        assert_screened(daemon, destination, study_uid)
        # The console's pages and files come from the wheel too.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=30) as page:
            assert page.status == 200 and b"<form" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/static/style.css", timeout=30) as css:
            assert css.status == 200
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        daemon.close()
        destination.stop()
    assert HIDDEN_MARK not in (tmp_path / "hs" / "serve.log").read_text()
