"""Charts of a party's adjusted emissions balance, in the spirit of the chapter's Figure 11.1.

Written only when matplotlib is importable (it is an optional dependency): one PNG and one
SVG per party, by year: reported emissions, the corresponding adjustments applied (bars),
the adjusted balance and the NDC target. The numbers are those of ``balance.csv``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from itmolink.core.accounting import AccountingMethod, BalanceReport
from itmolink.sim.scenario import Party


def matplotlib_pyplot() -> Any | None:
    """``matplotlib.pyplot`` with a non-interactive backend, or None when not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "itmolink"  # stable ids in the SVG
    return importlib.import_module("matplotlib.pyplot")


def write_chart(party: Party, report: BalanceReport, directory: Path) -> list[Path]:
    """Write ``chart.png`` and ``chart.svg``; returns the paths (none without matplotlib)."""
    plt = matplotlib_pyplot()
    if plt is None:
        return []
    years = [row.year for row in report.rows]
    mt = 1e6
    reported = [(row.reported_emissions or 0) / mt for row in report.rows]
    adjusted = [(row.adjusted_emissions or 0) / mt for row in report.rows]
    applied = [row.applied_adjustment / mt for row in report.rows]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot(years, reported, marker="o", label="reported emissions")
    top.plot(years, adjusted, marker="s", label="adjusted balance (reported + CA)")
    targets = [(row.year, row.target / mt) for row in report.rows if row.target is not None]
    if report.method is AccountingMethod.TRAJECTORY:
        top.plot([y for y, _ in targets], [t for _, t in targets], "k--", label="NDC trajectory")
    elif targets:
        top.scatter([y for y, _ in targets], [t for _, t in targets], marker="*", s=180,
                    color="black", zorder=3, label="NDC target")  # fmt: skip
    elif report.period_target is not None:
        top.set_title(f"budget {report.period_target / mt:,.2f} Mt over the period", fontsize=9)
    top.set_ylabel("MtCO2e")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    colours = ["tab:red" if a > 0 else "tab:green" for a in applied]
    bottom.bar(years, applied, color=colours)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("CA applied (Mt)")
    bottom.set_xlabel("year")
    bottom.set_xticks(years)
    fig.suptitle(f"{party.name} ({party.code}): {report.method.value}")
    fig.tight_layout()
    paths = [directory / "chart.png", directory / "chart.svg"]
    fig.savefig(paths[0], dpi=100, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None})
    plt.close(fig)
    return paths
