"""The five AEF version 2 tables as files: one CSV per table and one XLSX workbook.

``write_aef(report, out_dir)`` writes, for the reported year Y,

- ``Y-submission.csv``, ``Y-authorizations.csv``, ``Y-actions.csv``,
  ``Y-holdings.csv`` and ``Y-authorized-entities.csv``;
- ``aef-Y.xlsx``, one sheet per table named as the table ("Table 4 Holdings").

The cells are exactly the text :mod:`itmolink.core.aef` produced (it already
formats integers without separators and sorts the rows); nothing here
reorders, reformats or drops a value.

CSV: UTF-8 without a byte order mark, comma separated, "\\n" line endings,
a header row with the AEF column names. A field is quoted (RFC 4180, quotes
doubled) only when it holds a comma, a quote, a line break, or leading or
trailing white space, so no line ends in a space and every value reads back
unchanged. The same report always gives the same bytes.

XLSX: every cell is a text cell, so a value reads back exactly as in the
CSV (no float rounding of long serial numbers, no "1.0" turned into 1, no
"=..." free text taken for a formula). The header row is bold, wrapped and
frozen; column widths fit the content. The document's created and modified
times, and the times of the entries in the zip container, are fixed to the
submission date, so the same report gives the same bytes with the same
openpyxl and zlib.

Existing files are never overwritten unless ``overwrite=True``; all target
paths are checked before anything is written.
"""

from __future__ import annotations

import datetime as dt
import io
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE, Cell
from openpyxl.styles import Alignment, Font
from openpyxl.utils import get_column_letter
from openpyxl.writer.excel import ExcelWriter

from itmolink.core.aef import AefReport, AefTable

# File-name slug of each table, in the order of AefReport.tables().
TABLE_SLUGS = ("submission", "authorizations", "actions", "holdings", "authorized-entities")

MAX_SHEET_NAME = 31
MIN_COLUMN_WIDTH = 6
MAX_COLUMN_WIDTH = 60
# A header longer than this wraps rather than widening its column.
MAX_HEADER_WIDTH = 30

_SHEET_NAME_FORBIDDEN = frozenset("[]:*?/\\")
_ZIP_EPOCH = dt.date(1980, 1, 1)  # the earliest time a zip entry can carry


def reported_year(report: AefReport) -> int:
    """The year the report is for, read from its Submission table."""
    return int(_submission_field(report, "Reported year"))


def submission_date(report: AefReport) -> dt.date:
    """The date of submission, read from its Submission table (dd/mm/yyyy)."""
    text = _submission_field(report, "Date of submission")
    return dt.datetime.strptime(text, "%d/%m/%Y").date()


def aef_file_names(report: AefReport) -> list[str]:
    """The names ``write_aef`` gives its files: the five CSVs in table order, then the XLSX."""
    year = reported_year(report)
    return [f"{year}-{slug}.csv" for slug in TABLE_SLUGS] + [f"aef-{year}.xlsx"]


def csv_bytes(table: AefTable) -> bytes:
    """``table`` as CSV: header row, then its rows in order, UTF-8, "\\n" line endings."""
    lines = [_csv_line(table.columns)]
    lines.extend(_csv_line(row) for row in table.rows)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def xlsx_bytes(report: AefReport) -> bytes:
    """The five tables as one workbook, one sheet per table, all cells text."""
    stamp = dt.datetime.combine(submission_date(report), dt.time())
    workbook = Workbook()
    workbook.remove(workbook.active)  # type: ignore[arg-type]
    for table in report.tables():
        _add_sheet(workbook, table)
    props = workbook.properties
    props.creator = "itmolink"
    props.lastModifiedBy = "itmolink"
    props.title = f"AEF {reported_year(report)}"
    props.created = stamp
    props.modified = stamp
    # Not workbook.save(): save_workbook() stamps the modified time with the clock.
    buffer = io.BytesIO()
    ExcelWriter(workbook, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED)).save()
    return _fixed_zip(buffer.getvalue(), stamp.date())


def write_aef(report: AefReport, out_dir: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the five CSV files and the XLSX workbook of ``report`` into ``out_dir``.

    Returns the paths written: the CSVs in table order, then the workbook.
    ``out_dir`` is created if missing. Raises FileExistsError, before
    writing anything, if a target exists and ``overwrite`` is false.
    """
    contents = [csv_bytes(table) for table in report.tables()]
    contents.append(xlsx_bytes(report))
    paths = [out_dir / name for name in aef_file_names(report)]
    if not overwrite:
        existing = [path for path in paths if path.exists()]
        if existing:
            names = ", ".join(str(path) for path in existing)
            raise FileExistsError(
                f"refusing to overwrite existing AEF report files: {names} "
                "(pass overwrite=True to replace them)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in zip(paths, contents, strict=True):
        # "xb" is exclusive: it still refuses a file created since the check above.
        with path.open("wb" if overwrite else "xb") as out:
            out.write(data)
    return paths


# -- CSV --------------------------------------------------------------------------------


def _csv_line(values: Sequence[str]) -> str:
    if len(values) == 1 and not values[0]:
        return '""'  # a one-column row with an empty cell, not a blank line
    return ",".join(_csv_field(value) for value in values)


def _csv_field(value: str) -> str:
    if any(c in value for c in ',"\n\r') or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


# -- XLSX -------------------------------------------------------------------------------


def _add_sheet(workbook: Workbook, table: AefTable) -> None:
    sheet = workbook.create_sheet(_sheet_name(table.name, workbook.sheetnames))
    bold = Font(bold=True)
    wrap = Alignment(wrap_text=True, vertical="top")
    for col, name in enumerate(table.columns, start=1):
        cell = sheet.cell(row=1, column=col)
        _set_text(cell, name, table.name)
        cell.font = bold
        cell.alignment = wrap
    for row_index, row in enumerate(table.rows, start=2):
        for col, value in enumerate(row, start=1):
            if value:
                _set_text(sheet.cell(row=row_index, column=col), value, table.name)
    sheet.freeze_panes = "A2"
    for col, name in enumerate(table.columns, start=1):
        width = _column_width(name, (row[col - 1] for row in table.rows))
        sheet.column_dimensions[get_column_letter(col)].width = width


def _set_text(cell: Cell, value: str, where: str) -> None:
    """Store ``value`` as a text cell, never as a formula or error value."""
    if ILLEGAL_CHARACTERS_RE.search(value):
        raise ValueError(
            f"{where}: {value!r} holds a control character that an XLSX cell cannot store"
        )
    cell.value = value
    cell.data_type = "s"


def _sheet_name(name: str, taken: Sequence[str]) -> str:
    bad = _SHEET_NAME_FORBIDDEN.intersection(name)
    if bad:
        raise ValueError(f"table name {name!r} has characters a sheet name cannot: {sorted(bad)}")
    sheet_name = name[:MAX_SHEET_NAME].strip()
    if not sheet_name or sheet_name.lower() in (t.lower() for t in taken):
        raise ValueError(f"table name {name!r} gives an empty or duplicate sheet name")
    return sheet_name


def _column_width(header: str, values: Iterable[str]) -> float:
    widest = min(_display_width(header), MAX_HEADER_WIDTH)
    for value in values:
        for line in value.splitlines():
            widest = max(widest, _display_width(line))
    return float(max(MIN_COLUMN_WIDTH, min(widest + 2, MAX_COLUMN_WIDTH)))


def _display_width(text: str) -> int:
    """Width in character cells: East Asian wide and full-width characters count two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fixed_zip(data: bytes, when: dt.date) -> bytes:
    """``data`` re-packed with every entry's time, mode and origin fixed."""
    stamp = max(when, _ZIP_EPOCH)
    date_time = (stamp.year, stamp.month, stamp.day, 0, 0, 0)
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for entry in source.infolist():
            info = zipfile.ZipInfo(entry.filename, date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever the platform
            info.external_attr = 0o644 << 16
            target.writestr(info, source.read(entry))
    return out.getvalue()


# -- helpers ----------------------------------------------------------------------------


def _submission_field(report: AefReport, column: str) -> str:
    rows = report.submission.as_dicts()
    if len(rows) != 1:
        raise ValueError(f"the Submission table has {len(rows)} rows, not one")
    return rows[0][column]
