"""The database row of a received instance, built from its decoded header.

Only the identity (Study, Series and SOP Instance UID, SOP Class) may refuse an instance;
every other value is optional and is left out or cut to its column when it does not fit.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from datetime import date
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage, MRImageStorage
from pynetdicom.events import Event

from headscreen.daemon.storage import InstanceStore, InvalidUid, check_uid
from headscreen.db.models import Series, Study
from headscreen.db.types import InstanceRecord

if TYPE_CHECKING:
    from headscreen.daemon.receiver import ReceiverStats

logger = logging.getLogger(__name__)

_MODALITY_OF_CLASS: dict[str, str] = {CTImageStorage: "CT", EnhancedCTImageStorage: "CT", MRImageStorage: "MR",
                      EnhancedMRImageStorage: "MR"}


def command_sop_uid(event: Event) -> str:
    return str(getattr(event.request, "AffectedSOPInstanceUID", None) or "").strip()


def build_record(header: Dataset, event: Event, calling_ae: str, store: InstanceStore,
                 *, size_bytes: int, stats: ReceiverStats | None = None) -> InstanceRecord:
    """The DB row for an instance; raises ``InvalidUid`` when its identity is unusable.

    Only the identity (Study, Series and SOP Instance UID, SOP Class) may refuse an
    instance. Every other value is optional: one that does not decode or is not valid
    for its VR is left out (None) and text is cleaned and cut to its column, so the
    database always takes the row; what was left out or cut is logged by keyword.
    """
    values = _OptionalValues(header)
    study_uid = check_uid("StudyInstanceUID", values.uid("StudyInstanceUID"))
    series_uid = check_uid("SeriesInstanceUID", values.uid("SeriesInstanceUID"))
    sop_uid = check_uid("SOPInstanceUID", values.uid("SOPInstanceUID"))
    sop_class = check_uid("SOPClassUID", values.uid("SOPClassUID"))
    command_uid = command_sop_uid(event)
    command_class = str(event.request.AffectedSOPClassUID or "").strip()
    if sop_uid != command_uid:
        raise InvalidUid("SOPInstanceUID differs from the C-STORE request's Affected SOP Instance UID")
    if sop_class != command_class:
        raise InvalidUid("SOPClassUID differs from the C-STORE request's Affected SOP Class UID")
    relative = store.relative_path(study_uid, series_uid, sop_uid)
    record = InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=relative.as_posix(),
        size_bytes=size_bytes,
        # Jobs are matched to bundles by modality: the SOP class stands in for a bad one.
        modality=values.code("Modality", _MODALITY_LEN) or _MODALITY_OF_CLASS.get(sop_class),
        series_number=values.integer("SeriesNumber"),
        series_description=values.text("SeriesDescription", _SERIES_DESCRIPTION_LEN),
        instance_number=values.integer("InstanceNumber"),
        slice_position=values.slice_position(),
        images_in_acquisition=values.integer("ImagesInAcquisition"),
        number_of_frames=values.integer("NumberOfFrames"),
        study_date=values.date("StudyDate"),
        patient_age=values.age("PatientAge"),
        patient_birth_date=values.date("PatientBirthDate"),
        station_name=values.text("StationName", _STATION_NAME_LEN),
        institution=values.text("InstitutionName", _INSTITUTION_LEN),
        calling_ae=calling_ae,
        # An identifier cut to fit would name another study or patient: left out instead.
        accession_number=values.code("AccessionNumber", _ACCESSION_LEN),
        patient_id=values.code("PatientID", _PATIENT_ID_LEN),
    )
    if values.dropped or values.truncated:
        # Keywords only: the values are patient data.
        logger.debug("header values left out of or cut to fit the instance's row", extra={
            "action": "header_values_dropped", "sop_instance_uid": sop_uid,
            "dropped": values.dropped, "truncated": values.truncated})
        if stats is not None:
            stats.add_sanitised(values.dropped, values.truncated)
    return record


def _column_length(column: Any) -> int:
    return int(column.property.columns[0].type.length)


# The columns the optional values fill (PostgreSQL refuses a longer value; SQLite keeps it).
_MODALITY_LEN = _column_length(Study.modality)
_SERIES_DESCRIPTION_LEN = _column_length(Series.series_description)
_STATION_NAME_LEN = _column_length(Study.station_name)
_INSTITUTION_LEN = _column_length(Study.institution)
_ACCESSION_LEN = _column_length(Study.accession_number)
_PATIENT_ID_LEN = _column_length(Study.patient_id)
# Integer columns are 32-bit on PostgreSQL.
_INT_COLUMN = range(-(2 ** 31), 2 ** 31)
_DA = re.compile(r"\d{8}")
_AS = re.compile(r"\d{3}[DWMY]")
# C0 and C1 controls, NUL padding among them: no column or screen wants them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What bytes the character set could not decode become: the value is not known.
_UNDECODED = "\ufffd"

# A value in its plainest form (below) is converted here from its bytes: pydicom's
# conversion of each element was the largest part of the receiver's CPU per instance
# after the network. Any other value, an empty one, a VR that is not the dictionary's,
# or an element already converted goes through pydicom as before, so the row is the same
# (tests/test_instance_record.py reads each case both ways). Printable ASCII reads the
# same in every character set pydicom decodes; a backslash (pydicom splits and strips
# each value) is not plain text.
_PLAIN_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7e]+")
_PLAIN_UID = re.compile(rb"[0-9.]{1,64}\x00?")
_PLAIN_DA = re.compile(rb"[0-9]{8}")
_PLAIN_AS = re.compile(rb"[0-9]{3}[DWMYdwmy]")
_PLAIN_IS = re.compile(rb"[+-]?[0-9]{1,11} ?")
_DS = rb" *[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *"
_PLAIN_DS_VALUES = re.compile(_DS + rb"(?:\\" + _DS + rb")*")
_DS_MAX_LEN = 16
_NOT_PLAIN = object()


@functools.cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag)


class _OptionalValues:
    """Reads the optional header values of one instance; never raises on them. Notes by
    keyword (never the value) what was left out (`dropped`) or cut to fit (`truncated`)."""

    def __init__(self, header: Dataset) -> None:
        self.header = header
        self.dropped: list[str] = []
        self.truncated: list[str] = []

    def _plain(self, keyword: str, form: re.Pattern[bytes]) -> Any:
        """The element's bytes when they are in `form`; None when it is absent; else _NOT_PLAIN."""
        tag, vr = _tag_and_vr(keyword)
        raw = self.header.get_item(tag)
        if raw is None:
            return None
        if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr):
            return _NOT_PLAIN
        value = raw.value
        return value if isinstance(value, bytes) and form.fullmatch(value) else _NOT_PLAIN

    def uid(self, keyword: str) -> Any:
        """An identifying UID as check_uid takes it (never refused here)."""
        plain = self._plain(keyword, _PLAIN_UID)
        if plain is _NOT_PLAIN:
            return self.header.get(keyword)
        return None if plain is None else plain.rstrip(b"\x00").decode("ascii")

    def _read(self, keyword: str) -> Any:
        try:
            return self.header.get(keyword)
        except Exception:  # unknown VR, a value that does not convert for its VR...
            self._drop(keyword)
            return None

    def _drop(self, keyword: str) -> None:
        self.dropped.append(keyword)

    def _string(self, keyword: str) -> str | None:
        """The value as read; None when absent, dropped when not text or not decoded."""
        value = self._read(keyword)
        if value is None:
            return None
        if isinstance(value, MultiValue) and all(isinstance(v, str) for v in value):
            value = "\\".join(value)  # a backslash read as a value separator
        elif not isinstance(value, str):
            value = getattr(value, "original_string", None)  # DA/TM objects keep what was read
            if not isinstance(value, str):
                self._drop(keyword)
                return None
        if _UNDECODED in value:
            self._drop(keyword)
            return None
        return value

    def _text(self, keyword: str) -> str | None:
        """Free text without control characters; None when that leaves nothing."""
        plain = self._plain(keyword, _PLAIN_TEXT)
        if plain is not _NOT_PLAIN:
            return None if plain is None else (plain.decode("ascii").strip() or None)
        value = self._string(keyword)
        return None if value is None else (_CONTROL.sub("", value).strip() or None)

    def _formatted(self, keyword: str, form: re.Pattern[bytes]) -> str | None:
        """A value of a formatted VR (DA, AS; `form`, its plainest): only padding is taken
        off, a control character inside leaves it invalid."""
        plain = self._plain(keyword, form)
        if plain is not _NOT_PLAIN:
            return None if plain is None else plain.decode("ascii")
        value = self._string(keyword)
        return None if value is None else (value.strip(" \x00") or None)

    def text(self, keyword: str, length: int) -> str | None:
        text = self._text(keyword)
        if text is not None and len(text) > length:
            self.truncated.append(keyword)
            text = text[:length].rstrip()
        return text

    def code(self, keyword: str, length: int) -> str | None:
        """A code string is left out when too long: a cut code would be another code."""
        text = self._text(keyword)
        if text is not None and len(text) > length:
            self._drop(keyword)
            return None
        return text

    def date(self, keyword: str) -> str | None:
        """DA: eight digits that form a real date."""
        text = self._formatted(keyword, _PLAIN_DA)
        if text is None:
            return None
        if _DA.fullmatch(text):
            try:
                date(int(text[:4]), int(text[4:6]), int(text[6:]))
                return text
            except ValueError:
                pass
        self._drop(keyword)
        return None

    def age(self, keyword: str) -> str | None:
        """AS: three digits and D, W, M or Y."""
        text = self._formatted(keyword, _PLAIN_AS)
        if text is None:
            return None
        if _AS.fullmatch(text.upper()):
            return text.upper()
        self._drop(keyword)
        return None

    def integer(self, keyword: str) -> int | None:
        plain = self._plain(keyword, _PLAIN_IS)
        if plain is not _NOT_PLAIN:
            return None if plain is None else self._in_int_column(keyword, int(plain))
        value = self._read(keyword)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, (bytes, bytearray)):
                raise TypeError("not a number")
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            self._drop(keyword)
            return None
        return self._in_int_column(keyword, number)

    def _in_int_column(self, keyword: str, number: int) -> int | None:
        if number not in _INT_COLUMN:
            self._drop(keyword)
            return None
        return number

    def _decimals(self, keyword: str) -> Any:
        plain = self._plain(keyword, _PLAIN_DS_VALUES)
        if plain is _NOT_PLAIN:
            return self._read(keyword)
        if plain is None:
            return None
        values = plain.split(b"\\")
        if any(len(value) > _DS_MAX_LEN for value in values):
            return self._read(keyword)
        return [float(value) for value in values]

    def slice_position(self) -> float | None:
        position = self._decimals("ImagePositionPatient")
        orientation = self._decimals("ImageOrientationPatient")
        if position is None or orientation is None:
            return None
        along = _along_normal(position, orientation)
        if along is None:
            self._drop("ImagePositionPatient")  # with the orientation: one derived value
        return along


def slice_position(header: Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (row x column direction)."""
    position = header.get("ImagePositionPatient")
    orientation = header.get("ImageOrientationPatient")
    if position is None or orientation is None:
        return None
    return _along_normal(position, orientation)


def _along_normal(position: Any, orientation: Any) -> float | None:
    """None unless three and six finite numbers give a finite position. The arithmetic of
    imaging.volume.slice_normal in plain floats: on three values numpy's per-call cost is
    most of the receiver's time for this header."""
    try:
        if len(position) != 3 or len(orientation) != 6:
            return None
        row_x, row_y, row_z, col_x, col_y, col_z = (float(v) for v in orientation)
        x, y, z = (float(v) for v in position)
    except (TypeError, ValueError):
        return None
    normal = (row_y * col_z - row_z * col_y, row_z * col_x - row_x * col_z, row_x * col_y - row_y * col_x)
    length = math.sqrt(sum(n * n for n in normal))
    if not (length > 1e-9 and math.isfinite(length)):
        normal, length = (0.0, 0.0, 0.0), 1.0  # degenerate: slice_normal's zero vector
    along = x * (normal[0] / length) + y * (normal[1] / length) + z * (normal[2] / length)
    return along if math.isfinite(along) else None
