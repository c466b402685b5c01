"""Synthetic DICOM for the receiver tests and the ingest bench (no patient data)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root


def make_uid(rng: random.Random) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(rng.random())])


def ct_slice(study_uid: str, series_uid: str, sop_uid: str, index: int, count: int,
             pixels: np.ndarray, *, spacing_mm: float = 2.5) -> Dataset:
    """One axial CT slice with coherent geometry and synthetic demographics."""
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=UID_ROOT, entropy_srcs=[study_uid, "frame"])
    ds.Modality = "CT"
    ds.PatientName = "PHANTOM^HEAD"
    ds.PatientID = "SYNTH0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientAge = "064Y"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "HEAD 2.5mm"
    ds.InstanceNumber = index + 1
    ds.ImagesInAcquisition = count
    ds.StationName = "CT01"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-0.5 * cols, -0.5 * rows, index * spacing_mm]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = spacing_mm
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_ct_series(out_dir: Path, count: int, *, rows: int = 64, cols: int = 64,
                    seed: int = 0) -> list[Path]:
    """Write a synthetic CT series (one file per slice) and return the paths in slice order."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    study_uid, series_uid = make_uid(rng), make_uid(rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = noise.integers(-1000, 1500, size=(rows, cols), dtype=np.int16)
        ds = ct_slice(study_uid, series_uid, make_uid(rng), index, count, pixels)
        path = out_dir / f"ct_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
