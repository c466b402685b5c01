"""Logging set-up: plain text or one JSON object per line, with structured extras.

Both formats stamp each event with an ISO 8601 time in UTC with its offset
("2026-01-05T08:00:00.123+00:00"), the clock the database and audit trail use. JSON is
one object per line, always: a traceback is a field of the object, and control
characters are escaped by the encoder. Neither format writes colour codes; escape
sequences that reach a message (a peer's AE title, a library's coloured output) are
removed, and in text a newline inside a message or a value is written as \\n, so one
event is one line (a traceback follows on indented lines).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from headscreen.daemon.config import Settings

# Record attributes that are not structured fields; uvicorn's color_message repeats the
# message with colour codes.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_BASE_KEYS = ("time", "level", "logger", "message")
# Extras that hold a traceback (headscreen.privacy.WithholdValues puts one in error_trace).
_TRACE_EXTRAS = ("error_trace",)
# ANSI/VT100 escape sequences: CSI (colours, cursor moves), OSC (titles), and single ESC x.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences and other control characters (tab and newline stay)."""
    return _CONTROL.sub("", _ANSI.sub("", text))


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return strip_ansi(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _one_line(text: str) -> str:
    return strip_ansi(text).replace("\r", "\\r").replace("\n", "\\n")


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per event, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": strip_ansi(record.getMessage()),
        }
        for key, value in _extras(record).items():
            # An extra named like a base key must not replace it.
            payload[f"{key}_" if key in _BASE_KEYS else key] = _clean(value)
        if record.exc_info:
            payload["exception"] = strip_ansi(self.formatException(record.exc_info))
        elif record.exc_text:
            payload["exception"] = strip_ansi(record.exc_text)
        if record.stack_info:
            payload["stack"] = strip_ansi(self.formatStack(record.stack_info))
        # ensure_ascii: every control character and non-ASCII letter is escaped, so the line
        # survives any terminal, journal or shipper.
        return json.dumps(payload, default=str, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL logger: message key=value ...` on one line; a traceback follows, indented."""

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        traces = [str(extras.pop(k)) for k in _TRACE_EXTRAS if k in extras]
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {_one_line(record.getMessage())}"
        line += "".join(f" {k}={_one_line(str(v))}" for k, v in extras.items())
        if record.exc_info:
            traces.append(self.formatException(record.exc_info))
        elif record.exc_text:
            traces.append(record.exc_text)
        if record.stack_info:
            traces.append(self.formatStack(record.stack_info))
        for trace in traces:
            line += "\n" + "\n".join(f"    {strip_ansi(t)}" for t in trace.splitlines())
        return line


class _Handler(logging.StreamHandler):
    """Ours, so that `is_set_up` can tell it from a host's (pytest's, an embedding program's)."""


def setup_logging(log_format: str = "text", level: str | int = "INFO") -> None:
    """One handler on the root logger, to stderr (the journal or the container log)."""
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def configure_logging(settings: Settings) -> None:
    setup_logging(settings.log_format, settings.log_level)


def is_set_up() -> bool:
    """Whether this process logs through setup_logging's handler."""
    return any(isinstance(h, _Handler) for h in logging.getLogger().handlers)
