"""The ``itmolink`` command line: key material, the node, and operator actions.

Operator commands talk to a running node through its admin interface, found
from ``--config`` (the node's ``node.toml``) or given with ``--admin``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from itmolink import __version__
from itmolink.admin.v1 import admin_pb2, admin_pb2_grpc
from itmolink.cli.node_ops import add_node_ops_parsers
from itmolink.cli.table import print_table
from itmolink.conformance.cli import add_conformance_parser
from itmolink.crypto.operators import add_operator, read_token, token_file
from itmolink.crypto.pki import (
    DEFAULT_HOSTS,
    PartyFiles,
    certificate_hosts,
    init_party,
    renew_node_certificate,
)
from itmolink.node.admin import REJECTION_CODE_KEY
from itmolink.node.config import ConfigError, load_config
from itmolink.sim.cli import add_simulate_parser
from itmolink.v1 import common_pb2, transfer_pb2

EXIT_REFUSED = 3
EXIT_TAMPERED = 4
EXIT_DISCREPANCY = 5
EXIT_USAGE = 2
FINAL_STATES = {
    transfer_pb2.TRANSFER_STATE_COMPLETED,
    transfer_pb2.TRANSFER_STATE_REJECTED,
    transfer_pb2.TRANSFER_STATE_VOIDED,
}


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code


def _state_name(state: int) -> str:
    return transfer_pb2.TransferState.Name(state).removeprefix("TRANSFER_STATE_")  # type: ignore[arg-type]


def _unit_name(unit_type: int) -> str:
    return common_pb2.UnitType.Name(unit_type).removeprefix("UNIT_TYPE_")  # type: ignore[arg-type]


# -- admin client ------------------------------------------------------------------------


def _admin_target(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin)
    try:
        return load_config(args.config).admin_target
    except ConfigError as exc:
        raise CliError(
            f"{exc}\n(give the node's configuration with --config, or --admin)"
        ) from None


def _token(args: argparse.Namespace) -> str:
    """The operator's token: --token-file, $ITMOLINK_TOKEN_FILE, or the node's admin token."""
    explicit = args.token_file or os.environ.get("ITMOLINK_TOKEN_FILE")
    if explicit:
        path = Path(explicit)
    else:
        try:
            path = token_file(load_config(args.config).keys.directory, "admin")
        except ConfigError as exc:
            raise CliError(f"{exc}\n(give the operator's token with --token-file)") from None
    try:
        return read_token(path)
    except FileNotFoundError:
        raise CliError(f"no operator token at {path}: pass --token-file") from None
    except PermissionError as exc:
        raise CliError(str(exc)) from None


class _Admin:
    """The admin stub with the operator's token on every call."""

    def __init__(self, args: argparse.Namespace) -> None:
        channel = grpc.insecure_channel(_admin_target(args))
        self._stub = admin_pb2_grpc.AdminServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {_token(args)}"),)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return functools.partial(method, metadata=self._metadata)


def _admin(args: argparse.Namespace) -> Any:
    return _Admin(args)


def _call(method: Any, request: Any, timeout: float = 30) -> Any:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        exc: Any = error  # a grpc.Call as well as an RpcError
        metadata = {key: value for key, value in exc.trailing_metadata() or ()}
        if metadata.get(REJECTION_CODE_KEY):
            raise CliError(f"refused: {exc.details()}", EXIT_REFUSED) from None
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise CliError(f"not allowed: {exc.details()}") from None
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise CliError(
                "cannot reach the node's admin interface: is 'itmolink node run' running "
                "with this configuration?"
            ) from None
        raise CliError(f"admin call failed: {exc.code().name}: {exc.details()}") from None


def _emit_json(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


# -- commands ------------------------------------------------------------------------------


def cmd_pki_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        files = init_party(
            directory,
            args.party,
            args.registry or f"{args.party}-NR",
            hosts=args.host or DEFAULT_HOSTS,
            now=dt.datetime.now(dt.UTC),
        )
    except (ValueError, FileExistsError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(f"created key material for {args.party} in {directory}/")
    print(f"  {files.ca_certificate.name}, {files.node_certificate.name}  certificates (public)")
    print(
        f"  {files.ca_key.name}, {files.node_key.name}, {files.signing_key.name}  "
        "private keys (mode 0600; never share)"
    )
    print(f"  {files.card.name}  partner card: give this file to partner registries")
    return 0


def cmd_pki_renew(args: argparse.Namespace) -> int:
    try:
        keys = load_config(args.config).keys if args.config else PartyFiles(Path(args.dir))
        ca_key = Path(args.ca_key) if args.ca_key else keys.ca_key
        node_key = Path(args.node_key) if args.node_key else keys.node_key
        node_certificate = Path(args.node_cert) if args.node_cert else keys.node_certificate
        certificate = renew_node_certificate(
            ca_certificate=keys.ca_certificate,
            ca_key=ca_key,
            node_certificate=node_certificate,
            node_key=node_key,
            hosts=args.host,
            now=dt.datetime.now(dt.UTC),
        )
    except (ConfigError, ValueError, OSError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    hosts = ", ".join(certificate_hosts(certificate))
    print(
        f"renewed the node certificate: serial {certificate.serial_number:x}, valid until "
        f"{certificate.not_valid_after_utc:%Y-%m-%d}, hosts {hosts}"
    )
    print(f"  {node_certificate} and {node_key} (a new key) replaced; the old ones are kept as")
    print(f"  {node_certificate.name}.previous and {node_key.name}.previous")
    print(
        "  a node that reads these files takes them up at its next connection (a Docker file "
        "secret: restart it); partners need nothing new"
    )
    return 0


def cmd_operator_add(args: argparse.Namespace) -> int:
    try:
        directory = load_config(args.config).keys.directory
        path = add_operator(directory, args.name)
    except (ConfigError, ValueError, FileExistsError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(f"operator {args.name} added; token in {path} (mode 0600; give it to {args.name} only)")
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    from itmolink.node import eventloop
    from itmolink.node.logs import configure_logging
    from itmolink.node.runtime import Node

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    configure_logging(args.log_format, args.log_level, config.party)

    async def run() -> None:
        node = Node(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await node.start()
        except BaseException:
            await node.stop(0)
            raise
        await stop.wait()
        logging.getLogger("itmolink.node").info("signal received: shutting down gracefully")
        await node.stop(args.grace)

    eventloop.run(run())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = _call(_admin(args).GetNodeInfo, admin_pb2.GetNodeInfoRequest())
    if args.json:
        _emit_json(info)
        return 0
    print(f"party {info.party}, registry {info.registry}, schema version {info.schema_version}")
    print(f"partner port: {info.partner_address}")
    print_table(
        ["partner", "registry", "endpoint"],
        [[p.party, p.registry, p.endpoint] for p in info.partners],
    )
    return 0


def cmd_authorise(args: argparse.Namespace) -> int:
    request = admin_pb2.AuthoriseRequest(
        activity_id=args.activity_id,
        activity_name=args.activity_name or args.activity_id,
        activity_description=args.activity_description,
        cooperative_approach_id=args.cooperative_approach,
        acquiring_parties=args.acquiring_party,
        purposes=[common_pb2.Purpose.Value(f"PURPOSE_{p}") for p in args.purpose],
        oimp_detail=args.oimp_detail,
        first_transfer_definition=transfer_definition(args.first_transfer),
        vintage_from=args.vintage_from,
        vintage_to=args.vintage_to,
        quantity_cap=args.cap,
        unit_type=common_pb2.UnitType.Value(f"UNIT_TYPE_{args.unit_type}"),
        buyer_share_bp=round(args.buyer_share_percent * 100),
        voluntary_omge_bp=round(args.voluntary_omge_percent * 100),
    )
    stub = _admin(args)
    response = _call(stub.Authorise, request)
    say = (lambda *_: None) if args.quiet else print
    say(f"authorisation {response.authorisation_id} (version {response.version}) recorded")
    status = 0
    if args.wait:
        deadline = time.monotonic() + args.wait_seconds
        while True:
            views = _call(stub.ListAuthorisations, admin_pb2.ListAuthorisationsRequest())
            view = next(
                v for v in views.authorisations if v.authorisation_id == response.authorisation_id
            )
            if all(state != "pending" for state in view.party_states.values()):
                break
            if time.monotonic() > deadline:
                raise CliError(f"no answer from {', '.join(view.party_states)} yet; still pending")
            time.sleep(0.05)
        for party, state in sorted(view.party_states.items()):
            say(f"  {party}: {state}")
        if any(state != "acknowledged" for state in view.party_states.values()):
            status = EXIT_REFUSED
    if args.quiet:
        print(response.authorisation_id)
    return status


def transfer_definition(value: str) -> common_pb2.FirstTransferDefinition.ValueType:
    if value == "NONE":
        return common_pb2.FIRST_TRANSFER_DEFINITION_UNSPECIFIED
    return common_pb2.FirstTransferDefinition.Value(f"FIRST_TRANSFER_DEFINITION_{value}")


def cmd_issue(args: argparse.Namespace) -> int:
    response = _call(
        _admin(args).Issue,
        admin_pb2.IssueRequest(
            authorisation_id=args.authorisation, vintage=args.vintage, quantity=args.quantity
        ),
    )
    for block in response.blocks:
        quantity = block.serial_end - block.serial_start + 1
        print(
            f"issued {quantity:,} tCO2e as {response.issuance_id}: "
            f"serials {block.originating_registry}:{block.serial_start}-{block.serial_end}, "
            f"vintage {block.vintage}"
        )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    stub = _admin(args)
    response = _call(
        stub.Transfer,
        admin_pb2.TransferRequest(
            to_party=args.to,
            authorisation_id=args.authorisation,
            vintage=args.vintage,
            quantity=args.quantity,
            timeout_seconds=args.timeout,
            host_party=args.host or "",
        ),
    )
    print(f"transfer {response.transfer_id} proposed to {args.to}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.wait_seconds
    while True:
        view = _call(
            stub.GetTransfer, admin_pb2.GetTransferRequest(transfer_id=response.transfer_id)
        ).transfer
        if view.state in FINAL_STATES:
            break
        if time.monotonic() > deadline:
            raise CliError(f"transfer {response.transfer_id} is still {_state_name(view.state)}")
        time.sleep(0.05)
    print(f"transfer {response.transfer_id}: {_state_name(view.state)}")
    if view.state == transfer_pb2.TRANSFER_STATE_REJECTED:
        from itmolink.v1 import codes_pb2

        code = codes_pb2.RejectionCode.Name(view.rejection_code)
        print(f"  {code}: {view.rejection_detail}")
    return 0 if view.state == transfer_pb2.TRANSFER_STATE_COMPLETED else EXIT_REFUSED


def _batch_items(args: argparse.Namespace) -> list[admin_pb2.TransferBatchRequestItem]:
    """The transfers of ``transfer-batch``: from --csv, or one per --quantity."""
    if args.csv is not None:
        if args.quantity or args.authorisation:
            raise CliError(
                "give the transfers either with --csv or with --authorisation/--quantity"
            )
        import csv

        items = []
        with open(args.csv, newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    items.append(
                        admin_pb2.TransferBatchRequestItem(
                            authorisation_id=row["authorisation"].strip(),
                            vintage=int(row["vintage"]),
                            quantity=int(row["quantity"]),
                            host_party=(row.get("host") or "").strip(),
                        )
                    )
                except (KeyError, ValueError, AttributeError) as exc:
                    raise CliError(
                        f"{args.csv} line {line}: needs columns authorisation, vintage, quantity "
                        f"(and optionally host): {exc}"
                    ) from None
        return items
    if not args.quantity or not args.authorisation or args.vintage is None:
        raise CliError("give --authorisation, --vintage and one --quantity per transfer, or --csv")
    try:
        quantities = [int(q) for given in args.quantity for q in given.split(",") if q.strip()]
    except ValueError:
        raise CliError(f"--quantity takes whole tCO2e, not {args.quantity}") from None
    return [
        admin_pb2.TransferBatchRequestItem(
            authorisation_id=args.authorisation, vintage=args.vintage, quantity=quantity,
            host_party=args.host or "",
        )
        for quantity in quantities
    ]  # fmt: skip


def cmd_transfer_batch(args: argparse.Namespace) -> int:
    stub = _admin(args)
    items = _batch_items(args)
    response = _call(
        stub.TransferBatch,
        admin_pb2.TransferBatchRequest(to_party=args.to, items=items, timeout_seconds=args.timeout),
    )
    print(
        f"batch {response.batch_id} proposed to {args.to}: {len(response.transfer_ids)} transfers, "
        f"{sum(i.quantity for i in items):,} tCO2e"
    )
    if not args.wait:
        for transfer_id in response.transfer_ids:
            print(f"  {transfer_id}")
        return 0
    deadline = time.monotonic() + args.wait_seconds
    views: dict[str, admin_pb2.TransferView] = {}
    while True:
        for transfer_id in response.transfer_ids:
            if transfer_id not in views or views[transfer_id].state not in FINAL_STATES:
                views[transfer_id] = _call(
                    stub.GetTransfer, admin_pb2.GetTransferRequest(transfer_id=transfer_id)
                ).transfer
        waiting = [t for t, v in views.items() if v.state not in FINAL_STATES]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise CliError(f"{len(waiting)} transfers of batch {response.batch_id} are not final")
        time.sleep(0.05)
    from itmolink.v1 import codes_pb2

    for transfer_id in response.transfer_ids:
        view = views[transfer_id]
        print(f"  {transfer_id}: {_state_name(view.state)}")
        if view.state == transfer_pb2.TRANSFER_STATE_REJECTED:
            code = codes_pb2.RejectionCode.Name(view.rejection_code)
            print(f"    {code}: {view.rejection_detail}")
    completed = all(v.state == transfer_pb2.TRANSFER_STATE_COMPLETED for v in views.values())
    return 0 if completed else EXIT_REFUSED


def cmd_show(args: argparse.Namespace) -> int:
    stub = _admin(args)
    if args.what == "holdings":
        response = _call(stub.ListHoldings, admin_pb2.ListHoldingsRequest())
        if args.json:
            _emit_json(response)
            return 0
        from itmolink.core.identifier import format_identifier, identifier_of
        from itmolink.node.convert import block_from_pb

        rows = [
            [
                format_identifier(identifier_of(block_from_pb(h.block))),
                f"{h.block.serial_end - h.block.serial_start + 1:,}",
                h.block.authorisation_id,
                h.account,
                h.status + (f" ({h.transfer_id})" if h.transfer_id else ""),
            ]
            for h in response.blocks
        ]
        print_table(["unit identifier", "tCO2e", "authorisation", "account", "status"], rows)
        held = sum(h.block.serial_end - h.block.serial_start + 1 for h in response.blocks)
        print(f"total held: {held:,} tCO2e in {len(response.blocks)} block(s)")
    elif args.what == "transfers":
        response = _call(stub.ListTransfers, admin_pb2.ListTransfersRequest())
        if args.json:
            _emit_json(response)
            return 0
        print_table(
            ["transfer", "direction", "partner", "tCO2e", "state", "authorisation"],
            [
                [
                    t.transfer_id,
                    t.direction,
                    t.partner,
                    f"{t.quantity:,}",
                    _state_name(t.state),
                    t.authorisation_id,
                ]
                for t in response.transfers
            ],
        )
    elif args.what == "adjustments":
        response = _call(stub.ListAdjustments, admin_pb2.ListAdjustmentsRequest())
        if args.json:
            _emit_json(response)
            return 0
        print_table(
            ["year", "tCO2e", "unit", "partner", "transfer", "evidence (partner message)"],
            [
                [
                    a.year,
                    f"{a.amount:+,}",
                    _unit_name(a.unit_type),
                    a.partner,
                    a.transfer_id,
                    a.evidence_message_id,
                ]
                for a in response.adjustments
            ],
        )
        by_year: dict[int, int] = {}
        for a in response.adjustments:
            by_year[a.year] = by_year.get(a.year, 0) + a.amount
        for year, amount in sorted(by_year.items()):
            print(f"net corresponding adjustment {year}: {amount:+,} tCO2e")
    elif args.what == "authorisations":
        response = _call(stub.ListAuthorisations, admin_pb2.ListAuthorisationsRequest())
        if args.json:
            _emit_json(response)
            return 0
        print_table(
            ["authorisation", "host", "activity", "vintages", "cap", "issued", "acquiring parties"],
            [
                [
                    a.authorisation_id,
                    a.host_party,
                    a.activity_id,
                    f"{a.vintage_from}-{a.vintage_to}",
                    f"{a.quantity_cap:,}" if a.quantity_cap else "none",
                    f"{a.issued:,}",
                    ", ".join(f"{p} {s}" for p, s in sorted(a.party_states.items())),
                ]
                for a in response.authorisations
            ],
        )
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    request = admin_pb2.ReconcileRequest(partner=args.partner)
    _set_snapshot(request, args)
    report = _call(_admin(args).Reconcile, request, timeout=600)
    if args.json:
        _emit_json(report)
    else:
        _print_reconciliation(args.partner, report)
    return EXIT_DISCREPANCY if report.discrepancies else 0


def _set_snapshot(
    request: admin_pb2.ReconcileRequest | admin_pb2.RecoverTransfersRequest,
    args: argparse.Namespace,
) -> None:
    """The request's snapshot from ``--snapshot-age``; unset leaves the node's default."""
    if args.snapshot_age is not None:
        moment = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=args.snapshot_age)
        request.snapshot_at.FromDatetime(moment)


def _print_reconciliation(partner: str, report: admin_pb2.ReconcileResponse) -> None:
    print(
        f"reconciliation {report.reconciliation_id} with {partner}, snapshot "
        f"{report.snapshot_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC: "
        f"{report.transfers_here} transfers here; {report.queries} queries, "
        f"{report.buckets_compared} buckets and {report.leaves_compared} leaves compared"
    )
    if report.discrepancies:
        print_table(
            ["phase", "subject", "detail", "frozen blocks"],
            [[d.phase, d.subject, d.detail, d.frozen_blocks] for d in report.discrepancies],
        )
    else:
        print("no discrepancy: the two registries agree on totals, blocks and journal")


def cmd_recover(args: argparse.Namespace) -> int:
    request = admin_pb2.RecoverTransfersRequest(partner=args.partner)
    _set_snapshot(request, args)
    response = _call(_admin(args).RecoverTransfers, request, timeout=1800)
    last = response.after if response.HasField("after") else response.before
    if args.json:
        _emit_json(response)
        return EXIT_DISCREPANCY if last.discrepancies else 0
    _print_reconciliation(args.partner, response.before)
    if not response.transfers:
        print(f"no transfer is final at {args.partner} and unknown here: nothing to recover")
    else:
        print_table(
            ["transfer", "outcome", f"at {args.partner}", "detail"],
            [[t.transfer_id, t.outcome, t.partner_state, t.detail] for t in response.transfers],
        )
    if response.HasField("after"):
        print("after recovery:")
        _print_reconciliation(args.partner, response.after)
    return EXIT_DISCREPANCY if last.discrepancies else 0


def cmd_unfreeze(args: argparse.Namespace) -> int:
    response = _call(
        _admin(args).ReleaseFrozenBlocks,
        admin_pb2.ReleaseFrozenBlocksRequest(transfer_id=args.transfer, reason=args.reason),
    )
    if args.json:
        _emit_json(response)
        return 0
    total = sum(h.block.serial_end - h.block.serial_start + 1 for h in response.blocks)
    count = len(response.blocks)
    print(f"{count} block(s), {total:,} tCO2e, frozen for {args.transfer} are held again")
    return 0


def _aware_datetime(text: str) -> dt.datetime:
    """An ISO 8601 date-time with an offset, for argparse."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no offset: give one, e.g. 2027-03-01T00:00:00Z"
        )
    return moment.astimezone(dt.UTC)


def cmd_keys(args: argparse.Namespace) -> int:
    stub = _admin(args)
    if args.keys_command == "rotate":
        response = _call(stub.RotateSigningKey, admin_pb2.RotateSigningKeyRequest())
        print(
            f"new signing key {response.key_id} announced to every partner; the node signs "
            "with it once all have acknowledged it ('itmolink keys list' shows when)"
        )
    elif args.keys_command == "revoke":
        request = admin_pb2.RevokeSigningKeyRequest(key_id=args.key_id, partner=args.partner or "")
        if args.compromised_since is not None:
            request.compromised_since.FromDatetime(args.compromised_since)
        _call(stub.RevokeSigningKey, request)
        where = f"{args.partner}'s key, here" if args.partner else "at every partner"
        cascade = (
            f"; with the keys announced with it since {args.compromised_since.isoformat()}"
            if args.compromised_since is not None
            else ""
        )
        print(f"signing key {args.key_id} revoked ({where}){cascade}")
    elif args.keys_command == "cancel-rotation":
        response = _call(stub.CancelKeyRotation, admin_pb2.CancelKeyRotationRequest())
        print(
            f"rotation to signing key {response.key_id} given up: revoked where it may be "
            "pinned, its private key file deleted; the node signs with its current key"
        )
    else:
        response = _call(stub.ListSigningKeys, admin_pb2.ListSigningKeysRequest())
        print_table(
            ["party", "key", "status", "not after"],
            [
                [k.party, k.key_id, k.status,
                 k.not_after.ToDatetime().isoformat() if k.HasField("not_after") else "-"]
                for k in response.keys
            ],
        )  # fmt: skip
    return 0


def cmd_authorisation(args: argparse.Namespace) -> int:
    stub = _admin(args)
    if args.authorisation_command == "revoke":
        result = _call(
            stub.RevokeAuthorisation,
            admin_pb2.RevokeAuthorisationRequest(authorisation_id=args.authorisation),
        )
        print(
            f"authorisation {args.authorisation} revoked (version {result.version}): "
            f"{result.revoked_quantity:,} tCO2e revoked, {result.refused_quantity:,} refused "
            f"(already first-transferred), {result.unissued_revoked:,} of the cap never issued"
        )
        return 0
    request = admin_pb2.AmendAuthorisationRequest(
        authorisation_id=args.authorisation,
        acquiring_parties=args.acquiring_party or [],
        purposes=[common_pb2.Purpose.Value(f"PURPOSE_{p}") for p in args.purpose or []],
        oimp_detail=args.oimp_detail,
        vintage_from=args.vintage_from or 0,
        vintage_to=args.vintage_to or 0,
        quantity_cap=args.cap or 0,
        clear_cap=args.no_cap,
    )
    if args.first_transfer:
        request.first_transfer_definition = transfer_definition(args.first_transfer)
    result = _call(stub.AmendAuthorisation, request)
    print(f"authorisation {result.authorisation_id} amended: version {result.version} sent")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    response = _call(
        _admin(args).Retire,
        admin_pb2.RetireRequest(
            action=args.action, host_party=args.host or "", authorisation_id=args.authorisation,
            vintage=args.vintage, quantity=args.quantity, use_year=args.use_year or 0,
            oimp_purpose=args.oimp_purpose,
        ),
    )  # fmt: skip
    for block in response.blocks:
        print(
            f"{args.action}: {block.serial_end - block.serial_start + 1:,} tCO2e "
            f"({block.originating_registry}:{block.serial_start}-{block.serial_end}) moved to "
            f"account {response.account}"
        )
    return 0


def _ledger(args: argparse.Namespace) -> Any:
    """The node's configuration (with [accounting]) for a report read from its ledger."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if config.accounting is None:
        raise CliError(
            f"{config.path} has no [accounting] table: reports need the NDC period and method",
            EXIT_USAGE,
        )
    return config


@contextlib.contextmanager
def _read_ledger(database: Path | str) -> Iterator[Any]:
    """A read-only transaction on a ledger (SQLite file or PostgreSQL URL)."""
    from itmolink.store import LedgerUnavailable, read_only

    opened = read_only(database)
    try:
        tx = opened.__enter__()
    except FileNotFoundError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except LedgerUnavailable as exc:
        raise CliError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        stack.push(opened)
        yield tx


def cmd_report(args: argparse.Namespace) -> int:
    from itmolink.reports.build import ReportError

    if args.report == "aef":
        snapshot = _call(
            _admin(args).SnapshotHoldings, admin_pb2.SnapshotHoldingsRequest(year=args.year)
        )
        taken = snapshot.taken_at.ToDatetime(tzinfo=dt.UTC)
        print(
            f"holdings of 31 December {args.year}: "
            + ("frozen now" if snapshot.taken_now else f"as frozen on {taken:%Y-%m-%d %H:%M} UTC")
            + f" ({snapshot.blocks} blocks)"
        )
    config = _ledger(args)
    try:
        with _read_ledger(config.database) as tx:
            _report(args, config, tx)
    except ReportError as exc:
        raise CliError(str(exc)) from None
    return 0


def _report(args: argparse.Namespace, config: Any, tx: Any) -> None:
    from itmolink.reports import format_balance, write_aef
    from itmolink.reports.build import build_aef, build_balance

    if args.report == "aef":
        report = build_aef(
            tx, party=config.party, registry=config.registry, year=args.year,
            accounting=config.accounting, submission_date=dt.datetime.now(dt.UTC).date(),
        )  # fmt: skip
        try:
            paths = write_aef(report, Path(args.out), overwrite=args.overwrite)
        except FileExistsError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        for path in paths:
            print(f"wrote {path}")
    else:
        print(format_balance(
            build_balance(tx, accounting=config.accounting, reported=config.reported_emissions)
        ))  # fmt: skip


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check the hash chains offline, straight from the database: the journal of
    every envelope sent and received, and the operators' audit trail."""
    from itmolink.core.journal import verify_chain
    from itmolink.store import is_postgres_url
    from itmolink.store.postgres import redact

    database: Path | str
    if args.database:
        database = args.database if is_postgres_url(args.database) else Path(args.database)
    else:
        try:
            database = load_config(args.config).database
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    with _read_ledger(database) as tx:
        entries = list(tx.journal_entries())
        problems = verify_chain(entries, recorded_head=tx.journal_head())
        legacy, audit = tx.admin_audit_entries()
        audit_problems = verify_chain(
            audit, recorded_head=tx.admin_audit_head(), first_id=legacy + 1
        )
    if is_postgres_url(database):
        database = redact(str(database))
    for problem in problems:
        print(f"journal entry {problem.entry_id}: {problem.problem}")
    for problem in audit_problems:
        print(f"audit row {problem.entry_id}: {problem.problem}")
    if problems:
        print(f"journal of {database}: {len(problems)} problem(s) in {len(entries)} entries")
    else:
        print(f"journal of {database}: {len(entries)} entries, hash chain intact")
    unchained = f" ({legacy} earlier rows from before the chain)" if legacy else ""
    if audit_problems:
        print(f"audit trail of {database}: {len(audit_problems)} problem(s) in {len(audit)} rows")
    else:
        print(f"audit trail of {database}: {len(audit)} rows, hash chain intact{unchained}")
    return EXIT_TAMPERED if problems or audit_problems else 0


# -- parser --------------------------------------------------------------------------------


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="node.toml", help="the node's configuration (default: ./node.toml)"
    )
    parser.add_argument(
        "--admin", help="admin address instead of --config, e.g. unix:/path/admin.sock"
    )
    parser.add_argument(
        "--token-file",
        help="the operator's token (default: $ITMOLINK_TOKEN_FILE, else the node's "
        "operators/admin.token)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itmolink",
        description="Registry node for bilateral Article 6 ITMO transfers.",
    )
    parser.add_argument("--version", action="version", version=f"itmolink {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_simulate_parser(commands)
    add_conformance_parser(commands)

    pki = commands.add_parser("pki", help="create and renew key material").add_subparsers(
        dest="pki_command", required=True, metavar="ACTION"
    )
    init = pki.add_parser(
        "init", help="create a party's CA, node certificate, signing key and partner card"
    )
    init.add_argument("--party", required=True, help="ISO 3166-1 alpha-3 code, e.g. LAO")
    init.add_argument("--registry", help="registry identifier (default: PARTY-NR)")
    init.add_argument("--dir", required=True, help="directory to create the files in")
    init.add_argument(
        "--host",
        action="append",
        help="host name or IP of the node (repeatable; default: localhost, 127.0.0.1, ::1)",
    )
    init.set_defaults(func=cmd_pki_init)
    renew = pki.add_parser(
        "renew",
        help="replace the node's TLS key and certificate with new ones from the party's CA",
        description="Make a new TLS key and a node certificate for it, signed by the party's "
        "CA, valid for 825 days (at most until the CA expires), with the current certificate's "
        "subject and host names unless --host is given, and replace node.key and node.pem, "
        "keeping their owner and mode and the old files as *.previous. A running node that "
        "reads these files takes them up at its next connection, without a restart; partners "
        "pin the CA, so they need nothing new.",
    )
    where = renew.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the node's configuration (its [keys] paths)")
    where.add_argument("--dir", help="a key directory made by 'pki init'")
    renew.add_argument(
        "--ca-key", help="the CA's private key (default: ca.key in the key directory)"
    )
    renew.add_argument("--host", action="append", help="host name or IP of the node (repeatable)")
    renew.add_argument(
        "--node-key",
        help="the node's TLS key file to replace, if not node.key in the key directory (e.g. "
        "the file behind a Docker secret)",
    )
    renew.add_argument("--node-cert", help="the node certificate file, if not node.pem there")
    renew.set_defaults(func=cmd_pki_renew)

    node = commands.add_parser("node", help="run the registry node").add_subparsers(
        dest="node_command", required=True, metavar="ACTION"
    )
    run = node.add_parser("run", help="run the node until SIGINT or SIGTERM")
    run.add_argument("--config", required=True, help="the node's node.toml")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line (time, level, logger, message, fields)",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="on SIGTERM/SIGINT, seconds calls in progress get to finish (default: 10)",
    )
    run.set_defaults(func=cmd_node_run)
    add_node_ops_parsers(node)

    operator = commands.add_parser("operator", help="manage admin operators").add_subparsers(
        dest="operator_command", required=True, metavar="ACTION"
    )
    add = operator.add_parser("add", help="add an admin operator with a fresh token")
    add.add_argument("--config", default="node.toml", help="the node's configuration")
    add.add_argument("--name", required=True, help="e.g. alice")
    add.set_defaults(func=cmd_operator_add)

    info = commands.add_parser("info", help="show the node's identity and partners")
    _add_target(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    authorise = commands.add_parser(
        "authorise",
        help="authorise an activity and send the authorisation to the acquiring parties",
    )
    _add_target(authorise)
    authorise.add_argument("--activity-id", required=True)
    authorise.add_argument("--activity-name", default="")
    authorise.add_argument("--activity-description", default="")
    authorise.add_argument("--cooperative-approach", required=True, help="cooperative approach id")
    authorise.add_argument(
        "--acquiring-party", action="append", required=True, help="repeatable, e.g. KOR"
    )
    authorise.add_argument(
        "--purpose", action="append", choices=["NDC", "OIMP"], required=True, help="repeatable"
    )
    authorise.add_argument("--oimp-detail", default="", help="for OIMP, e.g. CORSIA")
    authorise.add_argument(
        "--first-transfer",
        default="NONE",
        choices=["NONE", "AT_AUTHORISATION", "AT_ISSUANCE", "AT_USE_OR_CANCELLATION"],
        help="for OIMP: when the first transfer happens",
    )
    authorise.add_argument("--vintage-from", type=int, required=True)
    authorise.add_argument("--vintage-to", type=int, required=True)
    authorise.add_argument("--cap", type=int, default=0, help="tCO2e cap (0: none)")
    authorise.add_argument(
        "--unit-type",
        default="ITMO",
        choices=["ITMO", "A6_4ER_AUTHORISED", "A6_4ER_MITIGATION_CONTRIBUTION", "TRANSITIONED_CER"],
    )
    authorise.add_argument(
        "--buyer-share-percent",
        type=float,
        default=0.0,
        help="share of every issuance first-transferred at once to the (single) acquiring "
        "party, e.g. 80 under the JCM",
    )
    authorise.add_argument(
        "--voluntary-omge-percent",
        type=float,
        default=0.0,
        help="share of every issuance cancelled for overall mitigation (OMGE)",
    )
    authorise.add_argument(
        "--wait", action="store_true", help="wait until every acquiring party has answered"
    )
    authorise.add_argument("--wait-seconds", type=float, default=30.0)
    authorise.add_argument(
        "--quiet", action="store_true", help="print only the authorisation id at the end"
    )
    authorise.set_defaults(func=cmd_authorise)

    issue = commands.add_parser("issue", help="issue units under an authorisation")
    _add_target(issue)
    issue.add_argument("--authorisation", required=True)
    issue.add_argument("--vintage", type=int, required=True)
    issue.add_argument("--quantity", type=int, required=True, help="tCO2e")
    issue.set_defaults(func=cmd_issue)

    transfer = commands.add_parser("transfer", help="transfer held units to a partner")
    _add_target(transfer)
    transfer.add_argument("--to", required=True, help="acquiring party, e.g. KOR")
    transfer.add_argument("--authorisation", required=True)
    transfer.add_argument(
        "--host", help="onward transfer: the party that authorised the units (default: this one)"
    )
    transfer.add_argument("--vintage", type=int, required=True)
    transfer.add_argument("--quantity", type=int, required=True, help="tCO2e")
    transfer.add_argument(
        "--timeout", type=int, default=0, help="seconds the partner has to accept (0: node default)"
    )
    transfer.add_argument(
        "--wait",
        action="store_true",
        help="wait until the transfer is completed, rejected or voided",
    )
    transfer.add_argument("--wait-seconds", type=float, default=60.0)
    transfer.set_defaults(func=cmd_transfer)

    batch = commands.add_parser(
        "transfer-batch",
        help="transfer held units to a partner as several transfers in one batched proposal",
        description="Propose up to 1,000 transfers to one partner in one signed "
        "TransferBatchProposal (docs/PROTOCOL.md 5.15). The partner accepts or rejects each "
        "transfer on its own; each is then an ordinary transfer (show transfers). All or "
        "nothing here: if any transfer fails this node's checks, nothing is proposed.",
    )
    _add_target(batch)
    batch.add_argument("--to", required=True, help="acquiring party, e.g. KOR")
    batch.add_argument("--authorisation", help="the authorisation of every --quantity")
    batch.add_argument(
        "--host", help="onward transfers: the party that authorised the units (default: this one)"
    )
    batch.add_argument("--vintage", type=int, help="the vintage of every --quantity")
    batch.add_argument(
        "--quantity", action="append", default=[],
        help="tCO2e of one transfer; repeat for each transfer of the batch (or give several "
        "comma-separated: --quantity 100,200,300)",
    )  # fmt: skip
    batch.add_argument(
        "--csv",
        help="a CSV file with a header row and one transfer per row: columns authorisation, "
        "vintage, quantity and optionally host (instead of --authorisation/--quantity)",
    )
    batch.add_argument(
        "--timeout", type=int, default=0, help="seconds the partner has to accept (0: node default)"
    )
    batch.add_argument(
        "--wait",
        action="store_true",
        help="wait until every transfer is completed, rejected or voided, and print each",
    )
    batch.add_argument("--wait-seconds", type=float, default=60.0)
    batch.set_defaults(func=cmd_transfer_batch)

    show = commands.add_parser(
        "show", help="show holdings, transfers, adjustments or authorisations"
    )
    _add_target(show)
    show.add_argument("what", choices=["holdings", "transfers", "adjustments", "authorisations"])
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)

    reconcile = commands.add_parser(
        "reconcile",
        help="compare transfers with a partner (totals, blocks, journal); exit 5 and freeze "
        "the blocks involved on a discrepancy",
    )
    _add_target(reconcile)
    reconcile.add_argument("--partner", required=True, help="e.g. KOR")
    reconcile.add_argument(
        "--snapshot-age",
        type=float,
        help="compare transfers proposed more than this many seconds ago (default: 300)",
    )
    reconcile.add_argument("--json", action="store_true", help="print JSON")
    reconcile.set_defaults(func=cmd_reconcile)

    recover = commands.add_parser(
        "recover",
        help="give back the transfers a restored ledger lost, from a partner's signed "
        "records; exit 5 if discrepancies remain",
        description="After a restore from a backup older than the node's last transaction "
        "(and `itmolink node restored`): reconcile with the partner, ask it for the signed "
        "records (proposal, acceptance and, for two phases, the sender's completion) of every "
        "transfer final there and unknown here, apply those that verify (each signed by its "
        "sender, what this node signed checked with its own keys; the units of an outgoing "
        "transfer still held here, those of an incoming one held nowhere here), and "
        "reconcile again. What cannot be recovered is "
        "listed with the reason, for the operators to settle (docs/OPERATIONS.md 7, "
        "docs/PROTOCOL.md 7.9).",
    )
    _add_target(recover)
    recover.add_argument("--partner", required=True, help="e.g. KOR")
    recover.add_argument(
        "--snapshot-age",
        type=float,
        help="compare transfers proposed more than this many seconds ago (default: 0, all)",
    )
    recover.add_argument("--json", action="store_true", help="print JSON")
    recover.set_defaults(func=cmd_recover)

    unfreeze = commands.add_parser(
        "unfreeze",
        help="make the blocks a reconciliation discrepancy froze held again, once resolved",
        description="Make the blocks that reconciliation froze for a transfer held again, once "
        "the operators of both registries have resolved the discrepancy, or found it to be one "
        "of the known deviations (docs/PROTOCOL.md 11.9). Local to this registry: the partner "
        "is not told, and nothing checks that the discrepancy is gone. The operator and the "
        "reason are kept in the admin audit trail.",
    )
    _add_target(unfreeze)
    unfreeze.add_argument("--transfer", required=True, help="the transfer id the blocks name")
    unfreeze.add_argument(
        "--reason", required=True, help="how the discrepancy was resolved (kept in the audit)"
    )
    unfreeze.add_argument("--json", action="store_true", help="print JSON")
    unfreeze.set_defaults(func=cmd_unfreeze)

    keys = commands.add_parser("keys", help="rotate, revoke and list signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    rotate = keys.add_parser("rotate", help="make a new signing key and announce it to partners")
    _add_target(rotate)
    rotate.set_defaults(func=cmd_keys)
    revoke = keys.add_parser(
        "revoke", help="revoke an earlier key of this node, or with --partner a partner's key"
    )
    _add_target(revoke)
    revoke.add_argument("--key-id", required=True)
    revoke.add_argument("--partner", help="revoke this partner's key here only")
    revoke.add_argument(
        "--compromised-since",
        type=_aware_datetime,
        metavar="TIME",
        help="the key was stolen, at the latest at TIME (ISO 8601 with an offset, e.g. "
        "2027-03-01T00:00:00Z; whole seconds): the keys announced in-band with it at or "
        "after TIME are revoked with it, transitively. Without it the key is retired and "
        "only it is revoked",
    )
    revoke.set_defaults(func=cmd_keys)
    cancel = keys.add_parser(
        "cancel-rotation",
        help="give up the key being announced (refused or unanswered) and keep the current one",
    )
    _add_target(cancel)
    cancel.set_defaults(func=cmd_keys)
    list_keys = keys.add_parser("list", help="this node's and its partners' signing keys")
    _add_target(list_keys)
    list_keys.set_defaults(func=cmd_keys)

    authorisation = commands.add_parser(
        "authorisation", help="amend or revoke an authorisation of this registry"
    ).add_subparsers(dest="authorisation_command", required=True, metavar="ACTION")
    amend = authorisation.add_parser(
        "amend", help="record and send the next version (unset options keep their value)"
    )
    _add_target(amend)
    amend.add_argument("--authorisation", required=True)
    amend.add_argument("--acquiring-party", action="append", help="repeatable; replaces the list")
    amend.add_argument("--purpose", action="append", choices=["NDC", "OIMP"])
    amend.add_argument("--oimp-detail", default="")
    amend.add_argument(
        "--first-transfer", choices=["AT_AUTHORISATION", "AT_ISSUANCE", "AT_USE_OR_CANCELLATION"]
    )
    amend.add_argument("--vintage-from", type=int)
    amend.add_argument("--vintage-to", type=int)
    amend.add_argument("--cap", type=int, help="new tCO2e cap")
    amend.add_argument("--no-cap", action="store_true", help="remove the cap")
    amend.set_defaults(func=cmd_authorisation)
    revoke_auth = authorisation.add_parser(
        "revoke", help="revoke what may still be revoked (not units already first-transferred)"
    )
    _add_target(revoke_auth)
    revoke_auth.add_argument("--authorisation", required=True)
    revoke_auth.set_defaults(func=cmd_authorisation)

    retire = commands.add_parser(
        "retire", help="use held units toward the NDC or for OIMP, or cancel them voluntarily"
    )
    _add_target(retire)
    retire.add_argument("action", choices=["use-ndc", "use-oimp", "voluntary-cancellation"])
    retire.add_argument("--authorisation", required=True)
    retire.add_argument("--host", help="the authorising party (default: this node's party)")
    retire.add_argument("--vintage", type=int, required=True)
    retire.add_argument("--quantity", type=int, required=True, help="tCO2e")
    retire.add_argument("--use-year", type=int, help="use-ndc: the year used toward")
    retire.add_argument("--oimp-purpose", default="", help="use-oimp: e.g. CORSIA")
    retire.set_defaults(func=cmd_retire)

    report = commands.add_parser("report", help="AEF tables and the adjusted emissions balance")
    reports = report.add_subparsers(dest="report", required=True, metavar="REPORT")
    aef = reports.add_parser(
        "aef", help="write the five AEF tables of a year as CSV and XLSX (freezes the holdings "
        "of 31 December on first use)",
    )  # fmt: skip
    _add_target(aef)
    aef.add_argument("--year", type=int, required=True)
    aef.add_argument("--out", required=True, help="directory to write the files to")
    aef.add_argument("--overwrite", action="store_true", help="replace existing files")
    aef.set_defaults(func=cmd_report)
    ca = reports.add_parser(
        "ca", help="the adjusted emissions balance by year against the target, per method"
    )
    ca.add_argument("--config", default="node.toml", help="the node's configuration")
    ca.set_defaults(func=cmd_report)

    audit = commands.add_parser("audit", help="check the node's evidence").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    verify = audit.add_parser(
        "verify",
        help="verify the hash chains of the journal and of the operators' audit trail "
        "(exit 4 if an entry was edited, removed, inserted or reordered)",
    )
    verify.add_argument("--config", default="node.toml", help="the node's configuration")
    verify.add_argument(
        "--database",
        help="the database instead of --config: a SQLite file or a postgresql:// URL",
    )
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"itmolink: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
