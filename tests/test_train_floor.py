"""`headscreen train` shows its work and refuses a model that learnt nothing.

A tiny dataset CSV whose one lesion validation case is the very scan of its one healthy
validation case: every score ties, so the validation AUROC is exactly 0.5, below the
default floor of 0.6 whatever the network learnt. The refused run writes no bundle and
exits 3 with one clear line; with --force the bundle is written and its manifest and
model card say it was forced. The log (stderr to a file) has one line per epoch with the
loss and validation figures and no terminal codes; on a terminal the progress bar shows.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import SimpleITK as sitk

from headscreen.imaging import phantoms

pytestmark = pytest.mark.slow  # trains (twice, seconds each on a 16^3 grid)

COARSE = {"grid": [16, 16, 16], "working_spacing_mm": 4.0,
          "registration": {"atlas_spacing_mm": 4.0, "rigid": {"iterations": 20}, "affine": {"iterations": 10}}}
EPOCHS = 2
TIMEOUT_S = 900  # generous: the machine is shared


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("floor")
    scans = folder / "scans"
    scans.mkdir()
    paths = []
    for i, age in enumerate((30.0, 70.0, 45.0, 55.0)):
        head = phantoms.make_head("CT", age=age, seed=700 + i, spacing=(2.0, 2.0, 2.0))
        path = scans / f"n{i}.nii.gz"
        sitk.WriteImage(head.image, str(path))
        paths.append((path.name, age))
    rows = [(paths[0], "train", "normal"), (paths[1], "train", "normal"), (paths[2], "val", "normal"),
            # The lesion validation case is the healthy one: its scores tie, AUROC 0.5.
            (paths[2], "val", "1"), (paths[3], "calibration", "normal"), (paths[3], "test", "normal"),
            (paths[2], "test", "1")]
    csv_path = folder / "dataset.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "age", "sex", "scanner", "split", "label"])
        for (name, age), split, label in rows:
            writer.writerow([f"scans/{name}", age, "F", "SIM-CT", split, label])
    params = folder / "coarse.json"
    params.write_text(json.dumps(COARSE))
    return {"dataset": csv_path, "params": params, "cache": folder / "cache", "models": folder / "models"}


def _argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "headscreen", "train", "--modality", "CT", "--method", "vae_ap",
            "--out", str(out), "--cache", str(inputs["cache"]), "--dataset", str(inputs["dataset"]),
            "--preprocessing", str(inputs["params"]), "--n-anomalous", "2", "--epochs", str(EPOCHS),
            "--batch-size", "2", "--device", "cpu", "--threads", "1", *extra]


def test_below_the_floor_is_refused_with_one_clear_line_and_a_clean_log(run_inputs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    out = run_inputs["models"] / "ct-floor-0.1.0"
    log_path = tmp_path / "train.log"
    with log_path.open("wb") as log_file:  # stderr is a file: no bar, the log only
        done = subprocess.run(_argv(run_inputs, out), stdout=subprocess.PIPE, stderr=log_file,
                              timeout=TIMEOUT_S, check=False)
    text = log_path.read_text()
    assert done.returncode == 3, text[-3000:]
    assert not out.exists()  # nothing written, not even the folder
    refusal = [line for line in text.splitlines() if "bundle refused" in line]
    assert len(refusal) == 1 and " ERROR " in refusal[0]
    assert "validation AUROC 0.500 is below the floor 0.600" in refusal[0] and "--force" in refusal[0]
    assert "Traceback" not in text
    # One line per epoch with the training loss and the validation figures (AUROC 0.5: the tie).
    epochs = [line for line in text.splitlines() if "action=train_epoch" in line]
    assert len(epochs) == EPOCHS, text[-3000:]
    for number, line in enumerate(epochs, start=1):
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        assert fields["epoch"] == str(number)
        assert float(fields["loss"]) > 0 and float(fields["val_rec"]) > 0 and "val_age_mae" in fields
        assert float(fields["val_auroc"]) == 0.5
    # A file gets no terminal control: no escape codes, no carriage returns of a bar.
    raw = log_path.read_bytes()
    assert b"\x1b" not in raw and b"\r" not in raw


def _run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (120 columns), as a person at a shell would."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        code = process.wait(timeout=TIMEOUT_S)
        reader.join(timeout=60)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_forced_bundle_is_written_and_says_so_and_the_terminal_shows_a_bar(run_inputs: dict[str, Path]) -> None:
    from headscreen.bundle import load_bundle

    out = run_inputs["models"] / "ct-forced-0.1.0"
    code, screen = _run_on_terminal(_argv(run_inputs, out, "--force"))
    assert code == 0, screen[-3000:]
    # The bar: its description, batches and the last epoch's figures beside it.
    assert f"vae_ap epoch {EPOCHS}/{EPOCHS}" in screen and "batch" in screen and "val_auroc=0.5" in screen
    assert "\r" in screen  # redrawn in place on a terminal
    assert "bundle below the quality floor written because --force was given" in screen

    manifest = load_bundle(out).manifest
    gate = manifest.training["quality_gate"]
    assert gate["forced"] is True and gate["passed"] is False
    assert gate["floor"] == 0.6 and gate["value"] == 0.5 == manifest.metrics["validation"]["auroc"]
    assert "--force" in manifest.training["command"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "**Forced: its validation AUROC 0.500 is below the quality floor 0.600." in card
    assert "| validation AUROC (quality floor 0.600: **below, forced**) | 0.500 |" in card
    # The per-epoch figures ship in the bundle's training_metrics.csv as well.
    with (out / "training_metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == EPOCHS and all(float(r["val_auroc"]) == 0.5 for r in rows)


def test_floor_is_checked_as_an_auroc() -> None:
    done = subprocess.run([sys.executable, "-m", "headscreen", "train", "--modality", "CT", "--method", "vae",
                           "--out", "x-0.1.0", "--min-val-auroc", "1.5"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and "1.5 is not an AUROC (0 to 1)" in done.stderr
    assert "Traceback" not in done.stderr
