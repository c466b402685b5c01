"""Coded concepts used in the SR and SC objects.

Standard codes (SCT, DCM, LN, UCUM) wherever one exists; concepts that have no
standard code use the private coding scheme ``99HEADSCREEN`` (documented, with
every code, in docs/conformance.md). Changing a code value here is a
conformance change: update that table in the same commit.
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept

__all__ = [
    "PRIVATE_SCHEME",
    "PRIVATE_SCHEME_NAME",
    "ANOMALY_SCORE",
    "ANOMALY_PERCENTILE",
    "OPERATING_THRESHOLD",
    "PREDICTED_BRAIN_AGE",
    "CHRONOLOGICAL_AGE",
    "BRAIN_AGE_GAP",
    "SCREEN_RESULT",
    "SCREEN_POSITIVE",
    "SCREEN_NEGATIVE",
    "ELIGIBILITY",
    "ELIGIBLE",
    "NOT_ELIGIBLE",
    "QC_ISSUE",
    "NOT_ELIGIBLE_REASON",
    "MEASUREMENT_ABSENT",
    "QUALITATIVE_EVALUATIONS",
    "HEALTHY_REFERENCE",
    "REFERENCE_BUNDLE",
    "REFERENCE_SITE",
    "REFERENCE_CALIBRATING",
    "ABSENT",
    "ANOMALY_FINDING",
    "ANOMALY_REGION",
    "ABNORMAL_STRUCTURE",
    "REGION_VOLUME",
    "MAXIMUM",
    "BRAIN",
    "UNIT_SCORE",
    "UNIT_PERCENT",
    "UNIT_YEAR",
    "UNIT_ML",
    "UNIT_NONE",
    "MAP_QUANTITY",
    "FAMILY_ANOGAN",
    "FAMILY_VAE_AGE",
    "algorithm_family_code",
    "procedure_code",
    "qc_reason_code",
    "concept_slug",
]

PRIVATE_SCHEME = "99HEADSCREEN"
PRIVATE_SCHEME_NAME = "headscreen private codes"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- measurement names (no standard code exists for these) -----------------
ANOMALY_SCORE = _private("HS0001", "Anomaly score")
ANOMALY_PERCENTILE = _private("HS0002", "Anomaly score percentile vs healthy reference")
OPERATING_THRESHOLD = _private("HS0003", "Anomaly score operating threshold")
# No LOINC or SNOMED CT concept for an image-derived brain age was found.
PREDICTED_BRAIN_AGE = _private("HS0004", "Predicted brain age")
BRAIN_AGE_GAP = _private("HS0005", "Brain age gap")
# Standard: the subject's age at the time of the study.
CHRONOLOGICAL_AGE = CodedConcept("121033", "DCM", "Subject Age")

# --- qualitative evaluations ------------------------------------------------
SCREEN_RESULT = _private("HS0010", "Anomaly screen result at operating point")
SCREEN_POSITIVE = CodedConcept("10828004", "SCT", "Positive")
SCREEN_NEGATIVE = CodedConcept("260385009", "SCT", "Negative")
ELIGIBILITY = _private("HS0011", "Eligibility for automated screening")
ELIGIBLE = _private("HS0012", "Eligible")
NOT_ELIGIBLE = _private("HS0013", "Not eligible")
QC_ISSUE = _private("HS0014", "Quality control issue")
# A blocking QC reason: the reason a study got no screening result at all.
NOT_ELIGIBLE_REASON = _private("HS0016", "Reason not eligible for automated screening")
# "Measurement not available = <measurement concept>" states that a value was not produced
# (never zero/normal). A NUM without a value (CID 42 qualifier) would be the DICOM way, but
# highdicom cannot read such a document back at all.
MEASUREMENT_ABSENT = _private("HS0015", "Measurement not available")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
# TID 1500 row 12: Pixelmed's TID 1501 has no qualitative-evaluation rows, so every coded
# evaluation and its detail text live in this report-level container.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

# Which healthy reference the percentile and screen result are against (site calibration):
# the bundle's, this scanner's own, or none yet (calibrating: no percentile, no screen result).
# The sentence naming it (bundle or station, n, date) is the Comment beneath.
HEALTHY_REFERENCE = _private("HS0017", "Healthy reference for percentile and screen result")
REFERENCE_BUNDLE = _private("HS0040", "Bundle reference (synthetic healthy phantoms)")
REFERENCE_SITE = _private("HS0041", "Site reference (this scanner's healthy studies)")
REFERENCE_CALIBRATING = _private("HS0042", "None yet: scanner calibrating, no screen result")

# --- finding / anatomy -------------------------------------------------------
ANOMALY_FINDING = _private("HS0020", "Brain anomaly screening")
BRAIN = CodedConcept("12738006", "SCT", "Brain")
# The SEG segment's category and property type; the SR's region group (TID 1411) names
# the same type as its Finding, so a reader can match the two.
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
ANOMALY_REGION = CodedConcept("263654008", "SCT", "Abnormal")
REGION_VOLUME = CodedConcept("118565006", "SCT", "Volume")
# TID 300 Derivation (CID 3488) of the anomaly map's maximum, reported with the point it lies at.
MAXIMUM = CodedConcept("56851009", "SCT", "Maximum")

# --- units (UCUM) -------------------------------------------------------------
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
UNIT_PERCENT = CodedConcept("%", "UCUM", "Percent")
UNIT_YEAR = CodedConcept("a", "UCUM", "year")
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
# The anomaly map's values are ratios (a z or an error over its healthy limit): dimensionless.
UNIT_NONE = CodedConcept("1", "UCUM", "no units")

# --- the parametric map's quantity (Real World Value Mapping, Quantity Definition) ----------
# What one unit of the map is, per kind of bundle (export.sc MAP_UNITS): no standard concept
# exists for a value in multiples of a healthy reference limit.
MAP_QUANTITY: dict[str, CodedConcept] = {
    "z": _private("HS0050", "Positive z-score in multiples of the healthy limit"),
    "error": _private("HS0051", "Voxel error in multiples of the healthy limit"),
    "z_one_sided": _private("HS0052", "One-sided positive z-score in multiples of the healthy limit"),
}

FAMILY_ANOGAN = _private("HS0030", "f-AnoGAN 3D anomaly detection")
FAMILY_VAE_AGE = _private("HS0031", "VAE 3D anomaly detection with brain age")
FAMILY_OTHER_VALUE = "HS0039"

# TID 1500 allows one Procedure Reported, from CID 100 (validators check it): CID 100 has
# no head CT or brain MR code, so the modality-level one; Finding Site says "Brain".
_PROCEDURES: dict[str, CodedConcept] = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
}
# Used when the source modality is neither CT nor MR (e.g. a study with no
# suitable series); the SR then still states the procedure generically.
_GENERIC_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# QC reason prefixes emitted by imaging.qc / imaging.volume and daemon.pipeline
# ("<prefix>: <detail>"), with stable code values. Unknown reasons still get
# coded (HS0199, the reason text as meaning) so nothing is dropped.
_QC_REASONS: dict[str, CodedConcept] = {
    "registration_poor": _private("HS0101", "Poor registration to template"),
    "registration_scale_implausible": _private("HS0102", "Implausible registration scale"),
    "orientation_unusual": _private("HS0103", "Unusual head orientation"),
    "skull_strip_poor": _private("HS0104", "Poor skull stripping"),
    "brain_volume_implausible": _private("HS0105", "Implausible brain volume"),
    "noise_high": _private("HS0106", "High image noise"),
    "slice_spacing_irregular": _private("HS0107", "Irregular slice spacing"),
    "qc_out_of_range": _private("HS0108", "QC metric out of range"),
    "no_suitable_series": _private("HS0109", "No suitable series"),
    "chronological_age": _private("HS0110", "Chronological age unavailable"),
    "skull_defect": _private("HS0111", "Skull defect (bone missing from the vault)"),
    "brain_age_implausible": _private("HS0112", "Brain-age estimate implausible, not reported"),
    "orientation_flipped": _private("HS0113", "Head orientation flipped (upside down or mirrored)"),
    "not_a_head": _private("HS0114", "Image does not show a head"),
    "brain_extraction_failed": _private("HS0115", "Brain extraction failed"),
    "registration_failed": _private("HS0116", "Registration to template failed"),
    "insufficient_coverage": _private("HS0117", "Insufficient head coverage"),
    "modality_mismatch": _private("HS0118", "Series modality does not match the model"),
    "geometry_assumed": _private("HS0119", "Slice geometry assumed, not stated in the images"),
    "missing_slices": _private("HS0120", "Missing slices"),
    "uneven_slice_spacing": _private("HS0121", "Uneven slice spacing"),
    "gantry_tilt": _private("HS0122", "Gantry tilt (resampled to an orthogonal grid)"),
    "header_values_dropped": _private("HS0123", "Header values left out (undecodable or invalid)"),
    "instances_excluded": _private("HS0124", "Undecodable instances left out of the series"),
    "seg_not_built": _private("HS0125", "Segmentation not built (source geometry unusable)"),
    "input_undecodable": _private("HS0126", "Stored instances do not decode"),
    "input_rejected": _private("HS0127", "Input rejected as unprocessable"),
}
QC_OTHER_VALUE = "HS0199"


def concept_slug(text: str) -> str:
    """Lower-case snake form used to match reason strings to codes."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def qc_reason_code(reason: str) -> CodedConcept:
    """Code for a QC reason string; the known table first, else the generic code
    whose meaning carries the reason text (truncated to the LO limit of 64)."""
    if not reason:
        raise ValueError("qc_reason_code: argument 'reason' must not be empty")
    key = concept_slug(reason.split(":", 1)[0])
    # Longest matching prefix, so "chronological_age_absent" finds "chronological_age".
    for prefix in sorted(_QC_REASONS, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "_"):
            return _QC_REASONS[prefix]
    return _private(QC_OTHER_VALUE, reason[:64])


def procedure_code(modality: str) -> CodedConcept:
    """The one Procedure Reported code (CID 100): 'CT' -> CT, 'MR' -> MRI, else imaging procedure."""
    return _PROCEDURES.get(modality, _GENERIC_PROCEDURE)


def algorithm_family_code(family: str) -> CodedConcept:
    """Code for an algorithm family name; tolerant of the spellings bundles use
    ('f-AnoGAN 3D', 'f-anogan-3d', '3D f-AnoGAN ...', 'VAE 3D brain age', 'vae-3d-age')."""
    slug = concept_slug(family)
    if "anogan" in slug:
        return FAMILY_ANOGAN
    if "vae" in slug:
        return FAMILY_VAE_AGE
    return _private(FAMILY_OTHER_VALUE, family[:64])


def known_qc_reasons() -> dict[str, CodedConcept]:
    """The QC reason table, for documentation and tests."""
    return dict(_QC_REASONS)
