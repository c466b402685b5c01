"""Chronological age from DICOM attributes: PatientAge, else birth and study dates."""

from __future__ import annotations

import re
from datetime import date

_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def parse_age_string(value: str | None) -> float | None:
    """'063Y' -> 63.0 years; None for absent or malformed values."""
    if not value:
        return None
    match = _AGE_STRING.match(str(value).strip().upper())
    if match is None:
        return None
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25


def _parse_da(value: str | None) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def chronological_age(
    patient_age: str | None, birth_date: str | None, study_date: str | None
) -> tuple[float | None, str]:
    """Age in years and where it came from ('PatientAge', 'dates', or why absent).

    Dates are preferred when both are present: PatientAge is rounded down to
    whole years, the dates are exact.
    """
    born, studied = _parse_da(birth_date), _parse_da(study_date)
    if born and studied and studied >= born:
        return (studied - born).days / 365.25, "dates"
    age = parse_age_string(patient_age)
    if age is not None:
        return age, "PatientAge"
    return None, "absent: no PatientAge and no usable PatientBirthDate/StudyDate"
