"""Clean copies of source headers, made before any result object is built from them.

highdicom copies the patient, study and equipment attributes of a source instance into
every SC, SEG and SR it builds, and refuses (ValueError) a value that does not decode
or does not validate for its VR: a PatientBirthDate of "1970-01-01" or "00000000", a
StudyTime of "99:99:99", an unknown SpecificCharacterSet, an element of unknown VR.
One such value must not cost the study its report, so the builders get a copy in which:

- every element that does not decode (unknown VR, a VR other than the dictionary's,
  bytes the character set cannot read, a DS/IS that is not a number, a DA/TM/DT that
  is not a date or time) is left out;
- the attributes the results copy (patient, study, equipment; `COPIED`) must also
  validate for their VR (length, repertoire, PatientSex M/F/O), else they are left
  out; the Type 2 ones among them are then present and empty;
- an unknown SpecificCharacterSet is left out, and with it every text value that is
  not plain ASCII (it cannot be read without one);
- every copy of one series carries the patient, study and series values of the first
  (`sanitise_sources`), so all objects of one result agree and one slice's bad value
  costs no other slice its report.

What was left out is said by attribute keyword only (`Sanitised.note`): the values
are patient data and never leave this module. Private elements are not copied (no
result needs them) and are not reported.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from highdicom.enum import SpecificCharacterSetValues
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, validate_value

_check_specific_character_set: Callable[..., Any] | None
try:  # the check highdicom applies to the character set it writes
    from highdicom.valuerep import _check_specific_character_set
except ImportError:  # a highdicom without it: its enumeration of defined terms
    _check_specific_character_set = None

__all__ = ["COPIED", "REFERENCE_KEYWORDS", "TYPE2", "NOTE_PREFIX", "ReferenceCopies", "Sanitised", "clean_header",
           "reference_copies", "sanitise_sources"]

logger = logging.getLogger(__name__)

NOTE_PREFIX = "header_values_dropped"
_NOTE_MAX_KEYWORDS = 12

# Type 2 attributes highdicom reads from its reference dataset by attribute (absent: AttributeError).
TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)

# What the results copy from a source and a receiver reads: validated for their VR, and
# the same on every copy. Patient and Patient Study, General Study, General Equipment.
COPIED = frozenset({
    *TYPE2,
    "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthTime", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "EthnicGroup", "PatientComments", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "QualityControlSubject", "StrainDescription",
    "StrainNomenclature", "StrainAdditionalInformation", "PatientAge", "PatientSize", "PatientWeight",
    "MedicalAlerts", "Allergies", "Occupation", "AdditionalPatientHistory", "SmokingStatus",
    "PregnancyStatus", "LastMenstrualDate", "PatientState", "AdmissionID", "AdmittingDiagnosesDescription",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "PatientSexNeutered",
    "ConsultingPhysicianName", "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "BodyPartExamined", "Modality",
    "FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
})
# What a result object reads of a source it only references or places (a SEG frame, an
# SR evidence item): identity, geometry and pixel description.
REFERENCE_KEYWORDS = frozenset({
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "NumberOfFrames", "ImageType", "AcquisitionNumber", "SliceLocation",
})
# Patient, study and series attributes: one set of values for every object of a result.
_SHARED = frozenset(COPIED - {"SOPInstanceUID", "SOPClassUID"})
_TYPE2_KEYWORDS = frozenset(TYPE2)
_ENUMERATED = {"PatientSex": {"M", "F", "O"}, "PatientIdentityRemoved": {"YES", "NO"}}

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
# Control characters (C0, DEL, C1) and the replacement character of bytes that did not
# decode; ESC (ISO 2022) is allowed everywhere, TAB, LF, FF and CR in free text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")
_CONTROL_SHORT = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")
_FREE_TEXT = frozenset({"LT", "ST", "UT"})
_PARSED = {"DA": DA, "TM": TM, "DT": DT}
# Digits and dots: UIDs with a leading zero in a component are common in the wild and
# harmless, so the standard's stricter form is not asked of them.
_UID = re.compile(r"[0-9.]{1,64}")
_PIXEL_GROUP = 0x7FE0
_CHARSET = BaseTag(0x00080005)


@dataclass(frozen=True)
class Sanitised:
    """Clean copies of source datasets, in the given order, and the keywords left out."""

    datasets: list[Dataset]
    dropped: tuple[str, ...] = ()

    @property
    def note(self) -> str | None:
        """An advisory QC reason naming what was left out (keywords only), or None."""
        if not self.dropped:
            return None
        shown = list(self.dropped[:_NOTE_MAX_KEYWORDS])
        more = len(self.dropped) - len(shown)
        return (f"{NOTE_PREFIX}: " + ", ".join(shown) + (f" and {more} more" if more else "")
                + " (not decodable or not valid for the VR: left out of the results)")


@dataclass(frozen=True)
class ReferenceCopies:
    """The reference-only copies (see `sanitise_sources`) of a series' later instances,
    each with what it left out, by index; made before the instances to copy whole are known."""

    count: int
    made: dict[int, tuple[Dataset, list[str]]]


def reference_copies(datasets: Sequence[Dataset]) -> ReferenceCopies:
    """What `sanitise_sources(datasets, full)` makes of each instance not in `full`, made
    ahead and then handed to it (the pipeline makes them while it maps the model's map
    back to the native slices)."""
    if not datasets:
        return ReferenceCopies(0, {})
    shared = _shared_values(clean_header(datasets[0])[0])
    return ReferenceCopies(len(datasets), {index: _copy_sharing(dataset, shared, REFERENCE_KEYWORDS)
                                           for index, dataset in enumerate(datasets[1:], start=1)})


def sanitise_sources(datasets: Sequence[Dataset], full: Collection[int] | None = None,
                     references: ReferenceCopies | None = None) -> Sanitised:
    """Clean copies of `datasets`, instances of one series (see module docstring): every
    copy carries the patient, study and series values of the first one, so the objects of
    one result agree. Never raises on the datasets' values.

    `full` (None: all) names the datasets an object is built from (the first always is);
    the others are only referenced (by UID, and placed by geometry), so their copies hold
    only `REFERENCE_KEYWORDS` and the shared values: a 300-slice series is cleaned in a
    fraction of the time. `references` (`reference_copies` of the same instances, in the
    same order) gives those copies made ahead."""
    if not datasets:
        return Sanitised([])
    if references is not None and references.count != len(datasets):
        raise ValueError("sanitise_sources: argument 'references' is not of these datasets")
    dropped: dict[str, None] = {}
    first, first_dropped = clean_header(datasets[0])
    dropped.update(dict.fromkeys(first_dropped))
    shared = _shared_values(first)
    clean = [first]
    wanted = None if full is None else set(full)
    for index, dataset in enumerate(datasets[1:], start=1):
        only = None if wanted is None or index in wanted else REFERENCE_KEYWORDS
        made = references.made.get(index) if references is not None and only is not None else None
        copy_, others = made if made is not None else _copy_sharing(dataset, shared, only)
        dropped.update(dict.fromkeys(others))
        clean.append(copy_)
    if dropped:
        logger.warning("source header values left out of the results",
                       extra={"action": "header_values_dropped", "attributes": list(dropped)})
    return Sanitised(clean, tuple(dropped))


def _shared_values(first: Dataset) -> dict[BaseTag, DataElement]:
    # The character set goes with the values it was read with.
    shared_tags = _tags_of(_SHARED)
    return {tag: first.get_item(tag) for tag in first.keys() if tag in shared_tags or tag == _CHARSET}


def _copy_sharing(dataset: Dataset, shared: dict[BaseTag, DataElement],
                  only: frozenset[str] | None) -> tuple[Dataset, list[str]]:
    """A clean copy of a later instance, the first one's shared values in place of its own."""
    shared_tags = _tags_of(_SHARED)
    type2 = _tags_of(_TYPE2_KEYWORDS)

    def share(elements: dict[BaseTag, Any]) -> None:
        for tag in [t for t in elements if (t in shared_tags or t == _CHARSET) and t not in shared]:
            del elements[tag]
        # The Type 2 attributes are all shared (skipped): the first's values go where
        # clean_header's empty ones would have, then the other shared values.
        for type2_tag in map(BaseTag, _type2_in_order()):
            if type2_tag in shared:
                elements[type2_tag] = _copied(shared[type2_tag])
        for tag, element in shared.items():
            if tag not in type2:
                elements[tag] = _copied(element)

    # Its own patient, study and series values are replaced by the first one's: not even read.
    return _clean_copy(dataset, skip=_SHARED, only=only, then=share)


@functools.lru_cache(maxsize=1)
def _type2_in_order() -> tuple[int, ...]:
    return tuple(tag for keyword in TYPE2 if (tag := tag_for_keyword(keyword)) is not None)


def _copied(element: DataElement) -> DataElement:
    """`copy.copy` of an element (its own object, sharing the value), without the reduce
    protocol's cost: a 300-slice series copies thousands."""
    if not isinstance(element, DataElement):  # a raw element is a tuple: immutable
        return copy.copy(element)
    twin = object.__new__(type(element))
    twin.__dict__.update(element.__dict__)
    return twin


@functools.lru_cache(maxsize=8)
def _tags_of(keywords: frozenset[str]) -> frozenset[int]:
    """The tags of dictionary keywords: a header's tag is looked up once, not named first."""
    return frozenset(tag for keyword in keywords if (tag := tag_for_keyword(keyword)) is not None)


def clean_header(dataset: Dataset, skip: frozenset[str] = frozenset(),
                 only: frozenset[str] | None = None, fill_type2: bool = True) -> tuple[Dataset, list[str]]:
    """One clean copy of `dataset` (pixel data kept as it is) and the keywords left out;
    the top-level attributes named in `skip`, or not named in `only` (when given), are
    left out unread (and not reported). Both name attributes of fixed tags (not of
    repeating groups such as 60xx). `fill_type2` False leaves absent `TYPE2` attributes
    absent (the caller fills them)."""
    clean, dropped = _clean_copy(dataset, skip, only)
    for keyword in TYPE2 if fill_type2 else ():
        if keyword not in clean:
            setattr(clean, keyword, None)  # Type 2: present, empty
    return clean, dropped


def _clean_copy(dataset: Dataset, skip: frozenset[str], only: frozenset[str] | None,
                then: Callable[[dict[BaseTag, Any]], None] | None = None) -> tuple[Dataset, list[str]]:
    """clean_header without its Type 2 step; `then` may change the copy's top-level
    elements (in order, by tag) before they become the copy."""
    dropped: list[str] = []
    with warnings.catch_warnings():
        # pydicom warns with the offending value in the text.
        warnings.simplefilter("ignore")
        charset_ok = _charset_usable(dataset)
        elements = _clean_elements(dataset, dropped, charset_ok, top=True, skip=skip, only=only)
    if not charset_ok and not skip:
        dropped.insert(0, "SpecificCharacterSet")
    if then is not None:
        then(elements)
    clean = _dataset_of(elements)
    if getattr(dataset, "filename", None) is not None:
        clean.filename = dataset.filename  # the pipeline reads the pixels again from it
    try:
        if getattr(dataset, "file_meta", None) is not None:
            clean.file_meta = copy.copy(dataset.file_meta)
    except Exception:  # a broken meta header: the results make their own
        pass
    return clean, list(dict.fromkeys(dropped))


def _clean_elements(dataset: Dataset, dropped: list[str], charset_ok: bool, top: bool,
                    skip: frozenset[str] = frozenset(), only: frozenset[str] | None = None) -> dict[BaseTag, Any]:
    """The clean copy's elements, in the dataset's order."""
    elements: dict[BaseTag, Any] = {}
    skipped = _tags_of(skip) if top else frozenset()
    wanted = _tags_of(only) if top and only is not None else None
    # Only the wanted tags are looked at (a set lookup each, not a Tag built per element).
    tags = list(dataset.keys()) if wanted is None else [t for t in dataset.keys() if t in wanted]
    for tag in tags:
        tag = tag if isinstance(tag, BaseTag) else Tag(tag)
        if tag.is_private or (top and tag == _CHARSET):
            continue
        if tag in skipped:
            continue
        keyword = keyword_for_tag(tag) or str(tag)
        try:
            element = dataset[tag]  # decodes a raw element
            kept = _kept(element, keyword, dropped, charset_ok)
        except Exception:  # unknown VR, undecodable bytes...: left out, by keyword
            dropped.append(keyword)
            continue
        if kept is not None:
            elements[kept.tag] = kept
        else:
            dropped.append(keyword)
    if top and charset_ok and "SpecificCharacterSet" in dataset:
        elements[_CHARSET] = DataElement(_CHARSET, "CS", dataset.SpecificCharacterSet)
    return elements


def _dataset_of(elements: dict[BaseTag, Any]) -> Dataset:
    """A dataset of `elements`, in their order. Without a sequence, Dataset takes the dict
    as it is (a 300-slice series makes thousands of copies' elements, and Dataset.add
    checks each); a sequence goes through Dataset.add, element by element, which makes
    its value a Sequence and tells its items the pixel representation."""
    if any(element.VR == "SQ" for element in elements.values()):
        clean = Dataset()
        for element in elements.values():
            clean.add(element)
        return clean
    return Dataset(elements)


def _kept(element: DataElement, keyword: str, dropped: list[str], charset_ok: bool) -> DataElement | None:
    """The element as the copy holds it, or None when it is left out."""
    if element.tag.group == _PIXEL_GROUP:
        return element
    vr = element.VR
    if not _vr_matches(element.tag, vr, strict=keyword in COPIED):
        return None
    if vr == "SQ":
        items = []
        for item in element.value:
            items.append(_dataset_of(_clean_elements(item, dropped, charset_ok, top=False)))
        return DataElement(element.tag, vr, items)
    if element.is_empty:
        return element
    values = list(element.value) if isinstance(element.value, (MultiValue, list, tuple)) else [element.value]
    if keyword in COPIED and not _vm_matches(element.tag, len(values)):
        return None  # a backslash in a name makes two values where one is allowed
    if vr in _TEXT_VRS and not all(_text_ok(vr, v, keyword, charset_ok) for v in values):
        return None
    if vr in ("DS", "FL", "FD") and not all(_finite(v) for v in values):
        return None
    if vr == "IS" and not all(_integer(v) for v in values):
        return None
    return element


def _vr_matches(tag: BaseTag, vr: str, strict: bool) -> bool:
    """A VR other than the dictionary's (a date stored as US) is not read as the dictionary
    says; UN is kept for tags pydicom does not know, never for what the results copy."""
    try:
        expected = dictionary_VR(tag)
    except KeyError:
        return not strict
    if vr == "UN":
        return not strict
    return vr in {part.strip() for part in expected.split(" or ")}


def _vm_matches(tag: BaseTag, count: int) -> bool:
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return True
    low, _, high = vm.partition("-")
    if not low.isdigit():
        return True
    if not high:
        return count == int(low)
    return count >= int(low) and (not high.isdigit() or count <= int(high))


def _text_ok(vr: str, value: object, keyword: str, charset_ok: bool) -> bool:
    text = str(value)
    if not charset_ok and not text.isascii():
        return False
    if (_CONTROL if vr in _FREE_TEXT else _CONTROL_SHORT).search(text.replace("\x1b", "")):
        return False
    if vr in _PARSED and text.strip():
        _PARSED[vr](text.strip())  # raises on a date or time that does not exist
    if vr in ("DS", "IS"):
        return True  # checked as numbers; lengths vary in the wild and nothing copies them as text
    if keyword not in COPIED and vr not in _PARSED:
        return True
    if vr == "PN" and any(group.count("^") > 4 for group in text.split("=")):
        return False  # at most five components per group
    allowed = _ENUMERATED.get(keyword)
    if allowed is not None and text.strip() not in allowed:
        return False
    if vr == "UI":
        return _UID.fullmatch(text.rstrip("\x00 ")) is not None
    # Length, repertoire and format of the VR, as a receiver would check them.
    validate_value(vr, text, config.RAISE)
    return True


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def _integer(value: object) -> bool:
    try:
        int(str(value).strip())
        return True
    except (TypeError, ValueError):
        return _finite(value) and float(value) == int(float(value))  # type: ignore[arg-type]


def _charset_usable(dataset: Dataset) -> bool:
    """True when the SpecificCharacterSet is absent or one highdicom writes and pydicom reads."""
    try:
        element = dataset["SpecificCharacterSet"] if "SpecificCharacterSet" in dataset else None
    except Exception:
        return False
    if element is None or element.is_empty:
        return True
    terms = [str(t) for t in (element.value if isinstance(element.value, MultiValue) else [element.value])]
    return _terms_known(terms)


def _terms_known(terms: Iterable[str]) -> bool:
    terms = list(terms)
    if _check_specific_character_set is not None:
        try:
            _check_specific_character_set(terms[0] if len(terms) == 1 else terms)
        except Exception:
            return False
    else:
        known = {v.value for v in SpecificCharacterSetValues}
        if not all(t in known or (i == 0 and t == "" and len(terms) > 1) for i, t in enumerate(terms)):
            return False
    return all(t in python_encoding for t in terms if t)
