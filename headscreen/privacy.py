"""Keeping patient data and secrets out of text we write: error reasons, log lines,
printed configuration.

pydicom, highdicom, numpy and the standard library quote the offending value in
their messages ("Unable to convert '1970-01-01' to 'DA' object"), and that value
may be a patient's name, ID or birth date. Such messages are never kept: a failure
is described by the exception's type and where it was raised. Our own errors
(HeadscreenError) are worded by us, and are still scrubbed of anything that looks
like a value, in case one quotes what it rejected.

Dependency-free (standard library only), so the database layer can use it too.
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

from headscreen.errors import HeadscreenError

WITHHELD = "<withheld>"
REDACTED = "***"
MAX_REASON_CHARS = 500

# The headscreen package as imported (a checkout or site-packages): its modules are ours,
# named relative to it ("daemon/worker.py") wherever it is installed.
_PACKAGE_ROOT = Path(__file__).parent
# Quoted text: Python's repr of str and bytes, and most libraries' messages, quote values.
_QUOTED = re.compile(r"""b?'[^'\n]*'|b?"[^"\n]*\"""")
# A DICOM person name has ^ between its components (Family^Given).
_PERSON_NAME = re.compile(r"[^\s,;:()\[\]{}]*\^[^\s,;:()\[\]{}]*")
# DA and DT values, and ISO dates; not inside UIDs or longer numbers.
_DATE_LIKE = re.compile(r"(?<![\w.])\d{4}[-/.]?\d{2}[-/.]?\d{2}(?:[\dT:.+-]*)(?![\w.])")
# Our own identifiers (storage and job UUIDs) are hex tokens whose digit runs can read
# like a date; they carry no patient value and are kept whole.
_UUID = re.compile(r"\b[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b")
# Free text after an attribute keyword ("PatientName=...", "PatientID: ...").
_PATIENT_OR_STUDY_KEYWORD = re.compile(
    r"\b(Patient\w*|Other\s?Patient\w*|Accession\w*|Referring\w*|StudyID|StudyDescription|"
    r"Admitting\w*|Institution\w*)\b(\s*[=:]\s*|\s+)\S+"
)


def _withhold_dates_outside_uuids(text: str) -> str:
    kept, start = [], 0
    for uuid in _UUID.finditer(text):
        kept += [_DATE_LIKE.sub(WITHHELD, text[start:uuid.start()]), uuid.group()]
        start = uuid.end()
    return "".join([*kept, _DATE_LIKE.sub(WITHHELD, text[start:])])


def scrub(text: str) -> str:
    """`text` with anything that looks like a DICOM value replaced by <withheld>."""
    text = _QUOTED.sub(WITHHELD, text)
    text = _PATIENT_OR_STUDY_KEYWORD.sub(lambda m: f"{m.group(1)}{m.group(2)}{WITHHELD}", text)
    text = _PERSON_NAME.sub(WITHHELD, text)
    text = _withhold_dates_outside_uuids(text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def failure_reason(exc: BaseException) -> str:
    """A failure in our own words: the exception type, and for anything not ours
    where it was raised instead of its message (which may quote patient data)."""
    kind = type(exc).__name__
    if isinstance(exc, HeadscreenError):
        return scrub(f"{kind}: {exc}")
    return scrub(f"{kind} (message withheld){_where(exc.__traceback__)}")


def _where(tb: object) -> str:
    frames = traceback.extract_tb(tb) if tb is not None else []  # type: ignore[arg-type]
    if not frames:
        return ""
    ours = [f for f in frames if _is_ours(f.filename)]
    raised = frames[-1]
    text = f" at {_short(ours[-1])}" if ours else ""
    if not ours or ours[-1] is not raised:
        text += f" (raised in {_short(raised)})"
    return text


def _is_ours(filename: str) -> bool:
    path = Path(filename)
    return path.is_relative_to(_PACKAGE_ROOT)


def _short(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    if _is_ours(frame.filename):
        name = path.relative_to(_PACKAGE_ROOT).as_posix()
    elif "site-packages" in path.parts:
        name = Path(*path.parts[path.parts.index("site-packages") + 1:]).as_posix()
    else:
        name = path.name
    return f"{name}:{frame.lineno} in {frame.name}"


def frames_only(exc_info: tuple) -> str:
    """A traceback without the exception's message: file, line and function of each frame."""
    kind, _, tb = exc_info
    lines = [f"  {_short(frame)}" for frame in traceback.extract_tb(tb)]
    name = kind.__name__ if kind is not None else "exception"
    return "\n".join(["Traceback (message withheld: it may quote patient data):", *lines, name])


# Extras that carry error text; other extras are identifiers, counts and paths we chose.
_ERROR_EXTRAS = ("error", "reason", "detail")


class WithholdValues(logging.Filter):
    """Scrubs log records of exception messages and of anything that looks like a value.

    Installed on the handlers, so it covers every library's records too: pydicom
    logs the invalid values it reads, and a logger.exception() in the receiver or
    the pipeline keeps its traceback's frames but not the message that quoted the
    data set.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.error_trace = frames_only(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep only the constant part
            message = str(record.msg)
        record.msg, record.args = scrub(message), None
        for key in _ERROR_EXTRAS:
            value = getattr(record, key, None)
            if isinstance(value, str):
                setattr(record, key, scrub(value))
        return True


def withhold_values_in_logs(handlers: list[logging.Handler] | None = None) -> None:
    """Put the WithholdValues filter on `handlers` (default: the root logger's), once each.

    Python warnings are routed into logging first: pydicom also warns (to stderr,
    so into the journal) with the invalid value in the text.
    """
    logging.captureWarnings(True)
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, WithholdValues) for f in handler.filters):
            handler.addFilter(WithholdValues())


# Secrets in configuration: passwords in URLs, and HTTP Authorization values.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?P<tail>@)")
_AUTH_VALUE = re.compile(r"(?P<head>\b(?:Bearer|Basic|Token|Digest)\s+)(?P<secret>[^\s'\",]+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL with the password of its user part replaced by ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", url)


def redact_authorization(value: str | None) -> str | None:
    """An Authorization header value shown as its scheme and ***, or None when unset."""
    if not value:
        return value
    scheme, _, credentials = value.strip().partition(" ")
    return f"{scheme} {REDACTED}" if credentials else REDACTED


def redact_secrets(text: str, known: list[str] | tuple[str, ...] = ()) -> str:
    """`text` with URL passwords, Authorization credentials and each of `known` replaced by ***."""
    for secret in sorted((s for s in known if s and len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", text)
    return _AUTH_VALUE.sub(lambda m: f"{m['head']}{REDACTED}", text)
