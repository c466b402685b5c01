"""What the installed-wheel tests share (tests/test_wheel.py, tests/test_container.py):
a clean virtual environment that cannot read Debian's mricron-data, the installed
`headscreen serve` as a Daemon, a phantom CT study, and the checks that it was screened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from daemon.bundle import MANIFEST_NAME
from serve_harness import Daemon, RecordingSCP, have, wait_until

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


def install_wheel_with_host_pip(wheel: Path, venv: Path) -> float:
    """A venv without pip, the wheel installed into it by this environment's pip; seconds."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                             "-q", "--no-compile", str(wheel)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic() - started


@dataclass
class InstalledDaemon(Daemon):
    """`headscreen serve` from a venv's console script, away from the source tree."""

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


def phantom_ct_study(folder: Path) -> tuple[list[Path], str]:
    """A small synthetic head CT series (no patient data); its files and Study Instance UID."""
    from imaging.phantoms import make_head, write_dicom_series

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
