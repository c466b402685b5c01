"""Reading back what an SR says, for tests of eligible and not-eligible reports.

The numbers sit in the one measurement group (TID 1501, or TID 1411 when the report
references a SEG's segment); the coded evaluations in the report-level Qualitative
Evaluations container (TID 1500 row 12), each followed by a
TEXT item named by its coded value when it has a detail (export/sr.py).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import highdicom as hd
import pydicom

from headscreen.export import codes


class ReadBack:
    """The measurement group (highdicom's, its methods pass through) and the report's
    qualitative evaluation items."""

    def __init__(self, report: hd.sr.Comprehensive3DSR):
        [self.group] = [*report.content.get_image_measurement_groups(),
                        *report.content.get_volumetric_roi_measurement_groups()]
        self.evaluation_items = qualitative_evaluation_items(report)

    def __getattr__(self, name: str):
        return getattr(self.group, name)


def measurement_group(sr_path: str) -> ReadBack:
    return ReadBack(hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path)))


def qualitative_evaluation_items(sr) -> list:
    """The items of the report-level Qualitative Evaluations container (empty when none);
    ``sr`` is the SR dataset, whose ContentSequence holds the root's children."""
    containers = [item for item in sr.ContentSequence
                  if item.ValueType == "CONTAINER"
                  and item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]
    assert len(containers) <= 1, "more than one Qualitative Evaluations container"
    return list(containers[0].ContentSequence) if containers else []


def evaluations_with_details(items) -> list[tuple[str, str, str]]:
    """(concept code, value code, detail) per CODE item; the detail is the TEXT item right
    after it that is named by its value, else ""."""
    found = []
    for i, item in enumerate(items):
        if item.ValueType != "CODE" or item.RelationshipType != "CONTAINS":
            continue
        value = item.ConceptCodeSequence[0]
        following = items[i + 1] if i + 1 < len(items) else None
        detail = ""
        if (following is not None and following.ValueType == "TEXT"
                and following.ConceptNameCodeSequence[0].CodeValue == value.CodeValue
                and following.ConceptNameCodeSequence[0].CodingSchemeDesignator == value.CodingSchemeDesignator):
            detail = str(following.TextValue)
        found.append((item.ConceptNameCodeSequence[0].CodeValue, value.CodeValue, detail))
    return found


def coded_evaluations(group: ReadBack) -> dict[str, list[tuple[str, str]]]:
    """Qualitative evaluations: concept code -> [(value code, detail text)].

    "Measurement not available = <measurement>" is listed under the measurement's code as
    (Absent, ""), so a test asks about a concept in one place whatever form the SR gives it.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for concept, value, detail in evaluations_with_details(group.evaluation_items):
        if concept == codes.MEASUREMENT_ABSENT.value:
            concept, value = value, codes.ABSENT.value
        found.setdefault(concept, []).append((value, detail))
    return found


def sr_texts(node) -> list[str]:
    """Every TEXT value in an SR content tree."""
    found = []
    for item in node.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(sr_texts(item))
    return found


# --------------------------------------------------------------------------- Pixelmed

PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
# The XSLT engine's default XPath limits are too small for Pixelmed's template rules.
_JAVA = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0",
         "-cp", PIXELMED_JAR]
# DicomSRValidator's main takes one file; this does what it does for each file in one JVM,
# reusing the validator whose construction (compiling the template rules) costs the most.
_MANY = """import com.pixelmed.validate.DicomSRValidator;
public class ValidateSRs {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("==== FILE " + path);
            System.out.print(validator.validate(path));
            System.out.println();
        }
    }
}
"""


def _has_java_compiler() -> bool:
    # The single-file source launcher needs a JDK; a JRE alone runs the validator's main.
    listed = subprocess.run(["java", "--list-modules"], capture_output=True, text=True, timeout=60)
    return "jdk.compiler" in listed.stdout


def pixelmed_findings(paths: list[Path], timeout_s: float = 900) -> dict[Path, list[str]]:
    """DicomSRValidator's output lines per file (Error/Warning lines are its findings)."""
    paths = [Path(path) for path in paths]
    if not _has_java_compiler():
        return {path: subprocess.run([*_JAVA, "com.pixelmed.validate.DicomSRValidator", str(path)],
                                     capture_output=True, text=True, timeout=timeout_s).stdout.splitlines()
                for path in paths}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "ValidateSRs.java"
        source.write_text(_MANY)
        run = subprocess.run([*_JAVA, str(source), *map(str, paths)], capture_output=True, text=True,
                             timeout=timeout_s)
    assert run.returncode == 0, run.stderr[-2000:]
    found: dict[Path, list[str]] = {}
    for block in run.stdout.split("==== FILE ")[1:]:
        name, *lines = block.splitlines()
        found[Path(name)] = lines
    assert set(found) == set(paths), run.stdout[-2000:]
    return found


def errors_and_warnings(lines: list[str]) -> tuple[list[str], list[str]]:
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])
