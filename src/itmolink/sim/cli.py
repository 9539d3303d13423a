"""``itmolink simulate FILE --out DIR [--seed N]``: the command, for cli/main.py to wire."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from itmolink.sim.runner import SimulationError, run_scenario
from itmolink.sim.scenario import ScenarioError, load_scenario


def add_simulate_parser(commands: Any) -> None:
    """Add the ``simulate`` subcommand to an ``add_subparsers()`` object."""
    simulate = commands.add_parser(
        "simulate", help="play a scenario file through real nodes; write tables and charts"
    )
    simulate.add_argument("file", type=Path, help="scenario TOML (see examples/)")
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    simulate.add_argument("--seed", type=int, default=0, help="order of play within a year")
    simulate.set_defaults(func=cmd_simulate)


def _bar(label: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(1, total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_simulate(args: argparse.Namespace) -> int:
    """Exit 0 with the summary table on stdout; 2 for a bad file; 1 if the run fails."""
    try:
        scenario = load_scenario(args.file)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        summary = run_scenario(scenario, args.out, seed=args.seed, progress=_bar)
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.table(), end="")
    for line in summary.invariants:
        print(f"ok: {line}")
    print(f"tables in {args.out} ({time.perf_counter() - started:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itmolink")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
