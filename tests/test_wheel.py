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
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from daemon.bundle import MANIFEST_NAME, TRAINING_ONLY_FILES
from daemon.orthanc import free_port
from serve_harness import Daemon, RecordingSCP, have, storescu, wait_until

pytestmark = pytest.mark.slow  # builds the wheel, installs it in a clean venv: `make test-fast` leaves it out

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "db", "export", "imaging", "model_training")
# 11.7 MiB when written (two bundles 8.3 MiB compressed, Colin27 3.3 MiB, code 0.4 MiB);
# room for a third bundle of the same size while a CT bundle is replaced, no more.
WHEEL_LIMIT_BYTES = 20 * 1024 * 1024
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# Loaded into every interpreter of the test venv (serve and its spawned workers) by a .pth
# file: opening anything of Debian's mricron-data fails, as on a host without it.
HIDE_DEBIAN = """\
import sys

def _no_mricron(event, args):
    if event == "open" and args and str(args[0]).startswith("/usr/share/mricron"):
        raise FileNotFoundError(2, "hidden by tests/test_wheel.py", str(args[0]))

sys.addaudithook(_no_mricron)
"""


def bundle_dirs() -> list[Path]:
    root = REPO / "models"
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())


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


@dataclass
class InstalledDaemon(Daemon):
    """`headscreen serve` from the wheel's virtual environment, away from the source tree."""

    venv: Path | None = None

    def start(self, timeout_s: float = 120.0) -> InstalledDaemon:
        assert self.venv is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HEADSCREEN_", "VIRTUAL_ENV"))}
        log = (self.workdir / "serve.log").open("ab")
        self.process = subprocess.Popen([str(self.venv / "bin" / "headscreen"), "-c", str(self.config), "serve"],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                        start_new_session=True)
        wait_until(self.echo, timeout_s, 0.5, "C-ECHO from the installed headscreen serve")
        return self


def _install(wheel: Path, venv: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                             "-q", "--no-compile", str(wheel)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic() - started


def _venv_python(venv: Path, code: str) -> str:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            cwd=venv, timeout=300, env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_wheel_in_a_clean_venv_screens_a_study(wheel: Path, tmp_path: Path) -> None:
    from imaging.phantoms import make_head, write_dicom_series

    if not (have("storescu") and have("echoscu")):
        pytest.fail("dcmtk (storescu, echoscu) missing: run tests/install-system-deps.sh", pytrace=False)

    venv = tmp_path / "venv"
    seconds = _install(wheel, venv)
    print(f"\nclean venv with the wheel and its dependencies in {seconds:.0f} s")
    site = Path(_venv_python(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "_hide_mricron.py").write_text(HIDE_DEBIAN)
    (site / "_hide_mricron.pth").write_text("import _hide_mricron\n")
    # The installed code, bundles and template are the venv's own; no torch; no Debian Colin27.
    where = json.loads(_venv_python(venv, (
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

    phantom = make_head("CT", age=44.0, seed=5)
    study = write_dicom_series(phantom, tmp_path / "study", rows=192, cols=192, slices=60, slice_thickness=3.0,
                               series_description="HEAD 3.0 soft tissue")
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
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
        reports = [d for d in destination.datasets() if d.SOPClassUID == SR_CLASS]
        assert len(reports) == 1 and str(reports[0].StudyInstanceUID) == study_uid
        result = daemon.results()[0]
        assert result.eligible and result.anomaly_score is not None
        print(f"stage timings: {result.timings}")
        # The console's pages and files come from the wheel too.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=30) as page:
            assert page.status == 200 and b"<form" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/static/style.css", timeout=30) as css:
            assert css.status == 200
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        daemon.close()
        destination.stop()
    assert "hidden by tests/test_wheel.py" not in (tmp_path / "hs" / "serve.log").read_text()
