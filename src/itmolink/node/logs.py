"""Log output of ``itmolink node run``: text for people, JSON lines for collectors.

``--log-format json`` writes one JSON object per line::

    {"time": "2026-11-27T10:00:00.123Z", "level": "info", "logger": "itmolink.node",
     "message": "transfer LAO-... to KOR completed: 10 tCO2e debited",
     "party": "LAO", "transfer_id": "LAO-...", "partner": "KOR"}

Structured fields come from the ``extra=`` of a log call (``transfer_id``,
``message_id``, ``subject_id``, ``partner``, ``code``, ``operator``) and the
node's own ``party``, added to every record. Only these named fields are
copied; a log call never carries key material or tokens, and a test checks
that none reaches the output.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

FIELDS = ("party", "transfer_id", "message_id", "subject_id", "partner", "code", "operator")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        time = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                entry[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PartyFilter(logging.Filter):
    """Stamps every record with this node's party."""

    def __init__(self, party: str) -> None:
        super().__init__()
        self.party = party

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "party"):
            record.party = self.party
        return True


def configure_logging(
    log_format: str, level: str, party: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) as text or JSON lines."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    if party is not None:
        handler.addFilter(PartyFilter(party))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
