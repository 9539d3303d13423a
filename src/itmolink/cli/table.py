"""Plain-text tables for terminal output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w)
            if v[:1] in "+-0123456789" and v.replace(",", "").lstrip("+-").isdigit()
            else v.ljust(w)
            for v, w in zip(values, widths, strict=True)
        ).rstrip()

    print(line(list(headers)))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
