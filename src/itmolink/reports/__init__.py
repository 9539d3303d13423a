"""Report files and printouts built from the pure tables of :mod:`itmolink.core`.

- :mod:`itmolink.reports.aef_files`: the five AEF version 2 tables as CSV
  files and one XLSX workbook (``itmolink report aef``).
- :mod:`itmolink.reports.ca`: the adjusted emissions balance against the
  target as a plain-text table or rows for CSV/JSON (``itmolink report ca``).
"""

from __future__ import annotations

from itmolink.reports.aef_files import write_aef
from itmolink.reports.ca import balance_rows, format_balance

__all__ = ["balance_rows", "format_balance", "write_aef"]
