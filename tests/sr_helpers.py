"""Reading back what an SR says, for tests of eligible and not-eligible reports."""

from __future__ import annotations

import highdicom as hd
import pydicom


def measurement_group(sr_path: str):
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    [group] = report.content.get_image_measurement_groups()
    return group


def coded_evaluations(group) -> dict[str, list[tuple[str, str]]]:
    """Qualitative evaluations: concept code -> [(value code, detail text beneath it)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for item in group[0].ContentSequence:
        if item.ValueType != "CODE" or item.RelationshipType != "CONTAINS":
            continue
        details = [child.TextValue for child in item.get("ContentSequence", []) if child.ValueType == "TEXT"]
        found.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(
            (item.ConceptCodeSequence[0].CodeValue, " ".join(details)))
    return found


def sr_texts(node) -> list[str]:
    """Every TEXT value in an SR content tree."""
    found = []
    for item in node.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(sr_texts(item))
    return found
