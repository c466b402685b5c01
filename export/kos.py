"""The IHE IOCM rejection note: a Key Object Selection document that asks the PACS to hide
the instances of a result that a newer result of the same analysis supersedes.

Document title (113001, DCM, "Rejected for Quality Reasons"), from CID 7011, the titles
IOCM defines. A superseded result is not wrong for its patient: it was computed from a
study that was not yet whole (a late instance), and a better result replaces it. The other
titles say something else: 113037 "Rejected for Patient Safety Reasons" is for objects that
must never be seen again (wrong patient; archives treat it as a safety event), 113038
"Incorrect Modality Worklist Entry" for images filed under the wrong order, 113039 "Data
Retention Policy Expired" for deletion at the end of retention. Archives hide 113001
instances from regular use and keep them for audit.

The note lists every rejected instance (SC, SEG, SR; any number of series) in its content
(TID 2010) and in the Current Requested Procedure Evidence Sequence; it belongs to the
rejected instances' study and has a series of its own. It never lists another rejection note.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from headscreen.export.model import AlgorithmInfo, reference_header

__all__ = [
    "KOS_SERIES_DESCRIPTION",
    "KOS_SERIES_NUMBER",
    "KOS_STORAGE",
    "REJECTED_FOR_QUALITY_REASONS",
    "build_rejection_note",
    "rejected_instances",
]

logger = logging.getLogger(__name__)

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTED_FOR_QUALITY_REASONS = CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
KOS_SERIES_NUMBER = 9903
KOS_SERIES_DESCRIPTION = "Rejection note - superseded AI results"
#: The Key Object Description (113012): why, in words a reader of the note understands.
REJECTION_DESCRIPTION = "AI screening result superseded by a newer result of the same analysis (the study changed)"

_IDENTIFYING = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _check(rejected: Sequence[Dataset]) -> None:
    if not rejected:
        raise ValueError("build_rejection_note: argument 'rejected' is empty")
    for ds in rejected:
        missing = [k for k in _IDENTIFYING if not ds.get(k)]
        if missing:
            raise ValueError(f"build_rejection_note: a rejected instance lacks {', '.join(missing)}")
        if ds.SOPClassUID == KOS_STORAGE:
            raise ValueError("build_rejection_note: a rejection note is never itself rejected")
    if len({ds.StudyInstanceUID for ds in rejected}) != 1:
        raise ValueError("build_rejection_note: argument 'rejected' spans more than one study")
    uids = [ds.SOPInstanceUID for ds in rejected]
    if len(set(uids)) != len(uids):
        raise ValueError("build_rejection_note: argument 'rejected' lists an instance twice")


def build_rejection_note(
    rejected: Sequence[Dataset],
    algorithm: AlgorithmInfo | None = None,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """The rejection note for ``rejected``: headers (no pixels needed) of every instance of
    the superseded result, all of one study. Patient and study attributes come from the
    first one. ``algorithm`` names the software that decided (General Equipment)."""
    _check(rejected)
    # Type 2 patient/study attributes present and valid, as highdicom reads them by name.
    evidence = [reference_header(rejected[0]), *rejected[1:]]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=evidence,
        description=REJECTION_DESCRIPTION,
    )
    equipment: dict[str, Any] = {}
    if algorithm is not None:
        equipment = dict(manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.version[:64])
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=algorithm.manufacturer if algorithm is not None else "headscreen",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=KOS_SERIES_DESCRIPTION,
        **equipment,
    )
    logger.info("built rejection note", extra={"action": "kos_built", "sop_instance_uid": note.SOPInstanceUID,
                                               "rejected": len(rejected)})
    return note


def rejected_instances(note: Dataset) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, Series Instance UID) of what a rejection note
    lists, read back with highdicom (raises ValueError for anything but a rejection note)."""
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(note)
    title = document.ConceptNameCodeSequence[0]
    if (title.CodeValue, title.CodingSchemeDesignator) != ("113001", "DCM"):
        raise ValueError("rejected_instances: not a 'Rejected for Quality Reasons' note")
    classes = {}
    for item in document.content[0].ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            ref = item.ReferencedSOPSequence[0]
            classes[str(ref.ReferencedSOPInstanceUID)] = str(ref.ReferencedSOPClassUID)
    return {uid: (sop_class, document.resolve_reference(uid)[1]) for uid, sop_class in classes.items()}
