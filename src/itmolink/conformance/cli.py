"""``itmolink conformance``: the sub-commands of the conformance kit."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Any

ROLE_HELP = (
    "the role of the TARGET: 'host' = the target is the host party that authorises, issues "
    "and transfers units out, and the kit plays the acquiring party (the target's driver "
    "commands authorise, issue and propose); 'buyer' = the target is the acquiring party, "
    "and the kit plays the host (it sends authorisations, issuances and transfers)"
)

EXIT_CONFORMS, EXIT_DOES_NOT_CONFORM, EXIT_USAGE = 0, 1, 2


def add_conformance_parser(commands: Any) -> None:
    """Register ``itmolink conformance`` on the main parser's sub-parsers."""
    parser = commands.add_parser(
        "conformance",
        help="test a partner endpoint against the protocol (docs/PROTOCOL.md §13)",
    )
    sub = parser.add_subparsers(dest="conformance_command", required=True)

    run = sub.add_parser(
        "run",
        help="play the partner registry against a target endpoint, in stages",
        description=(
            "Play the partner registry against any endpoint serving "
            "itmolink.v1.PartnerService, over mutual TLS, in four stages: (1) connectivity "
            "and envelope, (2) authorisation and issuance, (3) transfers, (4) "
            "reconciliation. Every test of a stage must pass before the next stage runs. "
            "Exit status 0: every test passed; 1: a test failed or could not run; "
            "2: bad configuration."
        ),
    )
    run.add_argument("--target", required=True, help="HOST:PORT of the target's partner port")
    run.add_argument("--role", required=True, choices=["host", "buyer"], help=ROLE_HELP)
    run.add_argument(
        "--config", required=True, help="the kit's partner.toml (identity, target card, driver)"
    )
    run.add_argument("--junit", help="write JUnit XML results to this file")
    run.add_argument("--report", help="write a Markdown report to this file")
    run.add_argument(
        "--stages", type=int, default=4, choices=[1, 2, 3, 4], help="run stages 1 to N only"
    )
    run.add_argument("--quiet", action="store_true", help="print the summary only")
    run.set_defaults(func=cmd_conformance_run)

    init = sub.add_parser(
        "init",
        help="make the kit's identity: key material and a partner card for the target",
        description=(
            "Like 'itmolink pki init', plus an expired and a not-yet-valid signing key listed "
            "in the card, which the kit uses to check that the target refuses them. Give "
            "card.toml to the target's operator to pin in a TEST deployment only, and to remove "
            "after the run."
        ),
    )
    init.add_argument("--party", required=True, help="the kit's party code, e.g. XKT")
    init.add_argument("--registry", help="registry identifier (default: PARTY-NR)")
    init.add_argument("--dir", required=True, help="directory to create the files in")
    init.set_defaults(func=cmd_conformance_init)


def cmd_conformance_init(args: argparse.Namespace) -> int:
    from itmolink.conformance.config import init_kit_identity

    files = init_kit_identity(
        Path(args.dir),
        args.party,
        args.registry or f"{args.party}-NR",
        now=dt.datetime.now(dt.UTC),
    )
    print(f"kit identity for {args.party} in {files.directory}; give {files.card} to the target")
    print(
        "warning: the card lists keys valid for 10 years; pin it only in a test deployment of "
        "the target, and remove it from there after the run (docs/PROTOCOL.md §13.2)"
    )
    return 0


def cmd_conformance_run(args: argparse.Namespace) -> int:
    from itmolink.conformance.config import KitConfigError, load_kit_config
    from itmolink.conformance.report import junit_xml, markdown, result_line, summary
    from itmolink.conformance.runner import run_kit

    try:
        config = load_kit_config(args.config)
    except KitConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def progress(result: Any) -> None:
        if not args.quiet:
            print(result_line(result), flush=True)

    try:
        report = asyncio.run(
            run_kit(config, args.target, args.role, stages=args.stages, progress=progress)
        )
    except (OSError, KitConfigError) as exc:  # the kit cannot listen; no driver for the role
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.junit:
        Path(args.junit).write_bytes(junit_xml(report))
    if args.report:
        Path(args.report).write_text(markdown(report))
    print(summary(report))
    return EXIT_CONFORMS if report.passed else EXIT_DOES_NOT_CONFORM
