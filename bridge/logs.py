"""Logging: JSON lines by default (one object per record), or plain text for people.

Records may carry structured fields through ``extra={"fields": {...}}``; they
become top-level keys in JSON. Nothing logs query strings or request headers
other than the idempotency key, and the serving bridge puts a :class:`Redacting`
filter on the handler (:func:`redact_with`): every token it has used is replaced by
``<token>`` in each line's message, fields and traceback, whoever logs it (a
refusal's path, a topic held back, the Kafka client).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.redaction import Redactor

_RESERVED = {"time", "level", "logger", "message"}
#: The record attribute (set through ``extra=``) of a line whose fields were redacted
#: as they were made: the Redactor's ``logged`` that did it.
REDACTED_WITH = "redacted_with"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in _RESERVED})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:  # text that is not UTF-8: a path from the environment, say
            return orjson.dumps(_utf8(line), default=str).decode()


def _utf8(value: Any) -> Any:
    """``value`` with its text made UTF-8: a byte the environment or the file system
    gave as a surrogate (a path that is not UTF-8) as the escape \\udcff. orjson
    refuses surrogates: the line was lost to "--- Logging error ---", and an error
    at startup became a traceback."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_utf8(str(k)): _utf8(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_utf8(v) for v in value]
    return _utf8(str(value)) if not isinstance(value, int | float | bool | type(None)) else value


class TextFormatter(logging.Formatter):
    """One line per record for people: the message, then the fields as ``key=value``.

    Messages and fields carry what clients sent (a path, a key), and uvicorn
    decodes ``%0A`` in a path to a line break: control characters are escaped
    (``\\n``), and a field value with a space, quote or ``=`` is quoted, so no
    client can forge a line or a field. A traceback keeps its lines, each
    indented, so a line that starts in the first column is always a record's.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the message escaped and the traceback indented
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{printable(str(k))}={_value(v)}" for k, v in fields.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for extra in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if extra:
                text += "".join("\n    " + printable(line) for line in extra.splitlines())
        return text


def printable(text: str) -> str:
    """``text`` with every non-printable character (line breaks, escape sequences,
    bidi overrides) written as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class Redacting(logging.Filter):
    """Replaces the tokens ``redactor`` knows in a record's message, fields, traceback
    and stack: a handler's filter, so that it sees every logger's records. Fields
    that ``redactor`` redacted as they were made (the record's REDACTED_WITH is its
    ``logged``: a refusal's, cut to length) are left as they are: redacting them again
    would only double the work of each refusal."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        if not redactor:
            return True
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: the handler reports it
            return True
        redacted = redactor.redact(message)
        if redacted is not message:
            record.msg, record.args = redacted, ()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and getattr(record, REDACTED_WITH, None) != redactor.logged:
            record.fields = {k: self._value(v) for k, v in fields.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        return True

    def _value(self, value: object) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.redactor.redact(value if isinstance(value, str) else str(value))


def redact_with(redactor: Redactor) -> None:
    """Keep ``redactor``'s tokens out of every line the root logger's handlers write
    (see :class:`Redacting`); replaces the filter an earlier call put there."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, Redacting)]:
            handler.removeFilter(old)
        handler.addFilter(Redacting(redactor))


def configure(level: str, fmt: str) -> None:
    """Send every logger (uvicorn's too) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python's warnings (a library's RuntimeWarning, say) in the same format and
    # through the same redaction: written bare to stderr, they broke a JSON log's lines.
    logging.captureWarnings(True)
    # aiokafka reports every retry at ERROR; the bridge reports what matters itself.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    handler.addFilter(OncePerInterval("aiokafka", AIOKAFKA_REPEAT_SECONDS))
    handler.addFilter(demote_unknown_topic)


#: What aiokafka logs at ERROR when Kafka does not know a topic it was asked about.
_UNKNOWN_TOPIC = "Topic %s not found in cluster metadata"


def demote_unknown_topic(record: logging.LogRecord) -> bool:
    """aiokafka's ERROR about a topic Kafka does not know yet, a WARNING: it comes with
    the first event of every new type while a broker that creates topics on first use
    creates it (and during a replay that succeeds). When the topic stays missing the
    bridge says so itself (a topic held back, 503s in broker mode)."""
    if record.msg == _UNKNOWN_TOPIC and record.name == "aiokafka.cluster":
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


#: aiokafka logs a failed connection or metadata request at ERROR each time it
#: tries again: about 10 lines a second during an outage, with one event waiting.
AIOKAFKA_REPEAT_SECONDS = 60.0


class OncePerInterval(logging.Filter):
    """Lets a record of ``prefix``'s loggers through once per ``seconds`` for each
    of their messages (the format string, whatever its arguments), so that a
    library's retry loop cannot flood the log while the bridge's own lines say
    what is going on. A handler's filter: a logger's would miss its children's."""

    def __init__(self, prefix: str, seconds: float) -> None:
        super().__init__()
        self._prefix, self._dotted = prefix, prefix + "."
        self._seconds = seconds
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self._prefix and not record.name.startswith(self._dotted):
            return True
        key = (record.name, record.msg)
        last = self._last.get(key)
        if last is not None and record.created - last < self._seconds:
            return False
        if len(self._last) > 1000:  # messages are a library's constants; bounded anyway
            self._last.clear()
        self._last[key] = record.created
        return True
