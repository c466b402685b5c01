"""What the installed-wheel tests share (tests/test_wheel.py, tests/test_container.py):
a clean virtual environment that cannot read Debian's mricron-data, a phantom CT study,
and the checks that it was screened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from headscreen.bundle import MANIFEST_NAME
from serve_harness import Daemon, RecordingSCP, have

REPO = Path(__file__).resolve().parent.parent
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# Loaded into every interpreter of a test venv (serve and its spawned workers) by a .pth
# file: opening anything of Debian's mricron-data fails, as on a host without it.
HIDE_DEBIAN = """\
import sys

def _no_mricron(event, args):
    if event == "open" and args and str(args[0]).startswith("/usr/share/mricron"):
        raise FileNotFoundError(2, "hidden by tests/wheel_helpers.py", str(args[0]))

sys.addaudithook(_no_mricron)
"""
HIDDEN_MARK = "hidden by tests/wheel_helpers.py"


def bundle_dirs() -> list[Path]:
    root = REPO / "models"
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())


def require_dcmtk() -> None:
    if not (have("storescu") and have("echoscu")):
        pytest.fail("dcmtk (storescu, echoscu) missing: run tests/install-system-deps.sh", pytrace=False)


def venv_python(venv: Path, code: str) -> str:
    """Run `code` with the venv's interpreter, away from the source tree; its stdout."""
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            cwd=venv, timeout=300, env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    return result.stdout


def site_packages(venv: Path) -> Path:
    return Path(venv_python(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())


def hide_debian_templates(venv: Path) -> Path:
    """Make /usr/share/mricron unreadable to every interpreter of `venv`; its site-packages."""
    site = site_packages(venv)
    (site / "_hide_mricron.py").write_text(HIDE_DEBIAN)
    (site / "_hide_mricron.pth").write_text("import _hide_mricron\n")
    return site


def phantom_ct_study(folder: Path) -> tuple[list[Path], str]:
    """A small synthetic head CT series (no patient data); its files and Study Instance UID."""
    from headscreen.imaging.phantoms import make_head, write_dicom_series

    phantom = make_head("CT", age=44.0, seed=5)
    study = write_dicom_series(phantom, folder, rows=192, cols=192, slices=60, slice_thickness=3.0,
                               series_description="HEAD 3.0 soft tissue")
    return study, str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)


def assert_screened(daemon: Daemon, destination: RecordingSCP, study_uid: str) -> None:
    """One SR for the study reached the destination, from an eligible, scored result."""
    reports = [d for d in destination.datasets() if d.SOPClassUID == SR_CLASS]
    assert len(reports) == 1 and str(reports[0].StudyInstanceUID) == study_uid
    result = daemon.results()[0]
    assert result.eligible and result.anomaly_score is not None
    print(f"stage timings: {result.timings}")


def readable_by_others(root: Path) -> list[str]:
    """Files and folders under `root` that anyone on the machine may read or enter."""
    return [f"{path.relative_to(root)} {path.stat().st_mode & 0o777:o}" for path in [root, *root.rglob("*")]
            if path.stat().st_mode & 0o007]


def python_base() -> str:
    """The interpreter this environment's venv was made from (a fresh venv's python)."""
    return getattr(sys, "_base_executable", sys.executable) or shutil.which("python3") or sys.executable
