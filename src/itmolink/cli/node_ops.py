"""Operations subcommands of ``itmolink node``: health, check-config, backup, copy-store,
restored.

Kept apart from :mod:`itmolink.cli.main` so that other subcommands can be added
there without touching these.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from itmolink.node.config import ConfigError, load_config
from itmolink.store.sqlite import read_only_uri

EXIT_FAILED = 1
EXIT_USAGE = 2


def cmd_node_health(args: argparse.Namespace) -> int:
    """Ask the node's admin interface for its gRPC health status."""
    target = args.admin
    if not target:
        try:
            target = load_config(args.config).admin_target
        except ConfigError as exc:
            print(f"itmolink: {exc}", file=sys.stderr)
            return EXIT_USAGE
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            print(f"UNREACHABLE ({name}): no health answer from {target}", file=sys.stderr)
            return EXIT_FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED


def cmd_node_check_config(args: argparse.Namespace) -> int:
    from itmolink.node.checkconfig import check_config

    if args.config is not None and args.config_option is not None:
        print("itmolink: give the configuration once (--config or a path)", file=sys.stderr)
        return EXIT_USAGE
    checks = check_config(args.config or args.config_option or "node.toml")
    width = max(len(c.name) for c in checks)
    for check in checks:
        label = "FAIL" if not check.ok else "WARN" if check.warning else "OK  "
        print(f"{label}  {check.name.ljust(width)}  {check.detail}")
    failed = sum(not c.ok for c in checks)
    if failed:
        print(f"{failed} of {len(checks)} checks failed")
        return EXIT_FAILED
    warned = sum(c.warning for c in checks)
    print(f"all {len(checks)} checks passed" + (f", {warned} with a warning" if warned else ""))
    return 0


def cmd_node_backup(args: argparse.Namespace) -> int:
    """An online, consistent copy of a SQLite database (the node may be running)."""
    try:
        database = str(load_config(args.config).database)
    except ConfigError as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if database.startswith(("postgresql:", "postgres:")):
        print(
            "itmolink: the database is PostgreSQL: back it up with pg_dump or "
            "pg_basebackup (docs/OPERATIONS.md)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    source_path = Path(database)
    out = Path(args.out)
    if not source_path.exists():
        print(f"itmolink: {source_path}: no such database", file=sys.stderr)
        return EXIT_USAGE
    if out.exists():
        print(f"itmolink: {out} already exists; not overwriting it", file=sys.stderr)
        return EXIT_USAGE
    # The copy holds the whole ledger: readable by the owner only from its creation on.
    try:
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        print(f"itmolink: {out} already exists; not overwriting it", file=sys.stderr)
        return EXIT_USAGE
    os.chmod(out, 0o600)  # whatever the umask took away from 0600
    check = "the copy failed"
    try:
        source = sqlite3.connect(read_only_uri(source_path), uri=True)
        target = sqlite3.connect(out)
        try:
            source.backup(target)  # one step: a single consistent snapshot
            (check,) = target.execute("PRAGMA integrity_check").fetchone()
            (version,) = target.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            (entries,) = target.execute("SELECT COUNT(*) FROM journal").fetchone()
        finally:
            target.close()
            source.close()
    finally:
        if check != "ok":  # a copy that failed (or fails its check) is no backup: remove it
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{out}{suffix}").unlink(missing_ok=True)
    if check != "ok":
        print(f"itmolink: the copy fails SQLite's integrity check: {check}", file=sys.stderr)
        return EXIT_FAILED
    print(f"backed up {source_path} to {out}: schema version {version}, {entries} journal entries")
    return 0


def cmd_node_copy_store(args: argparse.Namespace) -> int:
    """Copy the node's SQLite ledger into an empty PostgreSQL database."""
    from itmolink.store import is_postgres_url
    from itmolink.store.copy import CopyError, copy_sqlite_to_postgres
    from itmolink.store.postgres import redact

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if is_postgres_url(config.database):
        print("itmolink: the node's database is already PostgreSQL", file=sys.stderr)
        return EXIT_USAGE
    if not is_postgres_url(args.to):
        print("itmolink: --to must be a postgresql:// URL", file=sys.stderr)
        return EXIT_USAGE
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        has_password = bool(conninfo_to_dict(args.to).get("password"))
    except psycopg.ProgrammingError as exc:
        print(f"itmolink: --to is not a valid PostgreSQL URL: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if has_password:
        print("itmolink: put no password in the URL: use passfile= or PGPASSFILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = copy_sqlite_to_postgres(
            Path(config.database), args.to, party=config.party, registry=config.registry
        )
    except CopyError as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for table, count in report.rows.items():
        if count:
            print(f"  {table:<24} {count:>10,} rows")
    print(
        f"copied {config.database} ({report.party}/{report.registry}, schema version "
        f"{report.schema_version}) into {redact(args.to)}: {sum(report.rows.values()):,} rows, "
        f"contents read back and compared, journal ({report.journal_entries} entries) and "
        f"audit trail ({report.audit_rows} rows) hash chains intact"
    )
    print(f"now set database = {args.to!r} in {args.config} and start the node")
    return 0


def cmd_node_restored(args: argparse.Namespace) -> int:
    """After restoring a backup older than the node's last transaction: move every id
    counter and every link's message sequence past what the lost tail of the ledger can
    have handed out, so that partners take the node's messages again."""
    import datetime as dt
    import getpass

    from itmolink.node.base import ID_COUNTERS, serial_counter
    from itmolink.node.convert import to_us
    from itmolink.store import is_postgres_url, open_store
    from itmolink.store.url import LedgerUnavailable

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not is_postgres_url(config.database) and not Path(config.database).exists():
        # Opening it would create an empty ledger: a wrong path, not a restored one.
        print(f"itmolink: {config.database}: no such database", file=sys.stderr)
        return EXIT_USAGE
    floor = to_us(dt.datetime.now(dt.UTC))
    try:
        store = open_store(config.database, party=config.party, registry=config.registry)
    except LedgerUnavailable as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with store.transaction() as tx:
            waiting = tx.outbox_pending_count()
            raised = tx.raise_counters(
                floor,
                [*ID_COUNTERS, serial_counter(config.registry)],
                [partner.card.party for partner in config.partners],
            )
            tx.admin_audit_put(
                operator=f"local:{getpass.getuser()}",
                method="node restored",
                request=f"floor={floor}",
                outcome=f"raised {len(raised)}: "
                + ", ".join(f"{what} {before}->{after}" for what, before, after in raised),
                now=floor,
            )
    finally:
        store.close()
    for what, before, after in raised:
        print(f"  {what:<32} {before:>20,} -> {after:,}")
    print(
        f"raised {len(raised)} counter(s) and sequence(s) to {floor:,} (microseconds since "
        "1970 now): nothing this node hands out from now on can be a number a partner saw "
        "from the ledger's lost tail."
    )
    if waiting:
        print(
            f"{waiting} message(s) wait in the outbox with the numbers they were sealed "
            "with: those sealed before the backup are safe to send; any the node sealed on "
            "the restored ledger before this step are refused once more (SEQUENCE_REUSED, "
            "final for them, logged as an ALARM naming them)."
        )
    print(
        "next: start the node and run `itmolink reconcile --partner P` for every partner. "
        "Transfers that happened after the backup are final at the partner only: settle "
        "them with each partner's operators before moving the units concerned "
        "(docs/OPERATIONS.md §7)."
    )
    return 0


def add_node_ops_parsers(node: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = node.add_parser(
        "health",
        help="print the node's gRPC health status (exit 0 only when SERVING); "
        "for container health checks",
    )
    where = health.add_mutually_exclusive_group()
    where.add_argument("--config", default="node.toml", help="the node's node.toml")
    where.add_argument("--admin", help="the admin address, e.g. unix:/path/admin.sock")
    health.add_argument(
        "--service", default="", help="a service name (default: the node as a whole)"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    health.set_defaults(func=cmd_node_health)

    check = node.add_parser(
        "check-config",
        help="check node.toml and everything it refers to without starting the node; "
        "exit 1 if a check fails",
    )
    # --config as every other command takes it; the positional form still works.
    check.add_argument(
        "config", nargs="?", default=None, help="the node's node.toml (or give --config)"
    )
    check.add_argument(
        "--config",
        dest="config_option",
        metavar="CONFIG",
        default=None,
        help="the node's node.toml (default: node.toml)",
    )
    check.set_defaults(func=cmd_node_check_config)

    backup = node.add_parser(
        "backup", help="copy the SQLite database consistently while the node runs"
    )
    backup.add_argument("--config", default="node.toml", help="the node's node.toml")
    backup.add_argument("--out", required=True, help="the backup file to create")
    backup.set_defaults(func=cmd_node_backup)

    copy = node.add_parser(
        "copy-store",
        help="copy the node's SQLite ledger into an empty PostgreSQL database (stop the node "
        "first)",
        description="Copy everything in the node's SQLite ledger (journal and audit trail "
        "included) into an empty PostgreSQL database, in one transaction, then read it back "
        "and compare it table by table and check both hash chains before committing. Stop "
        "the node first: what it writes during the copy would not be copied. Then point "
        "'database' in node.toml at the URL.",
    )
    copy.add_argument("--config", default="node.toml", help="the node's node.toml")
    copy.add_argument(
        "--to",
        required=True,
        help="the PostgreSQL database, a postgresql:// URL (a password comes from passfile= "
        "or PGPASSFILE)",
    )
    copy.set_defaults(func=cmd_node_copy_store)

    restored = node.add_parser(
        "restored",
        help="after restoring a backup older than the node's last transaction (node "
        "stopped): move id counters and message sequences past anything partners saw",
        description="Run once after restoring a backup taken before the node's last "
        "transaction, with the node (every process of it) stopped. The restored ledger "
        "would hand out again message sequence numbers, transfer, batch, issuance, "
        "authorisation and notice ids and serial numbers that the lost tail of the ledger "
        "had already used and that partners have seen: partners refuse such messages "
        "(SEQUENCE_REUSED) and would take such ids for the earlier ones. This raises every "
        "such counter to the current time in microseconds since 1970, past anything handed "
        "out before, and records the step in the operators' audit trail. It does not bring "
        "back what the lost tail recorded: reconcile with every partner afterwards.",
    )
    restored.add_argument("--config", default="node.toml", help="the node's node.toml")
    restored.set_defaults(func=cmd_node_restored)
