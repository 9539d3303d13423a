"""The operator's admin service, served on a local address only.

A refused request fails with FAILED_PRECONDITION (or INVALID_ARGUMENT for a
malformed one) and carries the rejection code in the trailing metadata key
``itmolink-rejection-code``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import text_format
from google.protobuf.json_format import MessageToJson, SerializeToJsonError

from itmolink.admin.v1 import admin_pb2, admin_pb2_grpc
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.node.convert import block_to_pb, from_us, timestamp, timestamp_us, to_us
from itmolink.node.engine import Engine, ReplyError
from itmolink.store.tx import TransferRecord, Tx

if TYPE_CHECKING:
    from itmolink.node.reconciliation import Report
    from itmolink.node.runtime import Node

REJECTION_CODE_KEY = "itmolink-rejection-code"
_INVALID_ARGUMENT = {
    RejectionCode.MISSING_FIELD,
    RejectionCode.QUANTITY_MISMATCH,
    RejectionCode.TOO_MANY_ITEMS,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def admin_method(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Authenticate the operator, run the request, and journal who did what.

    A refused request (:class:`Rejected`) becomes a gRPC error carrying its code.
    """

    @functools.wraps(method)
    async def wrapper(
        self: AdminServicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        operator = self._node.operator(context.invocation_metadata() or ())
        if operator is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no valid operator token: pass --token-file (a file made by 'itmolink pki init' "
                "or 'itmolink operator add')",
            )
            raise AssertionError("unreachable")
        failure: tuple[grpc.StatusCode, str, str | None] | None = None
        # Recorded before anything happens, so even a crash leaves a trace of who
        # asked for what; the outcome follows in a second entry.
        await self._audit(operator, method.__name__, request, "started")
        try:
            response = await method(self, request, context)
        except ReplyError as error:
            failure = (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the partner's answer cannot be used: {error}",
                error.code.wire_name,
            )
        except grpc.aio.AioRpcError as error:
            # Not UNAVAILABLE: that would read as "the admin interface is down".
            failure = (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the partner did not answer: {error.code().name} {error.details()}",
                None,
            )
        except Rejected as rejected:
            status = (
                grpc.StatusCode.INVALID_ARGUMENT
                if rejected.code in _INVALID_ARGUMENT
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            failure = (status, str(rejected), rejected.code.wire_name)
        except BaseException as error:
            await self._audit(operator, method.__name__, request, f"error: {type(error).__name__}")
            raise
        # The audit entry is written before the operator hears the outcome.
        if failure is None:
            await self._audit(operator, method.__name__, request, "ok")
            return response
        status, detail, code = failure
        await self._audit(operator, method.__name__, request, code or status.name)
        await context.abort(
            status, detail, trailing_metadata=((REJECTION_CODE_KEY, code),) if code else ()
        )
        raise AssertionError("unreachable")

    return wrapper


def _enum(kind: type[Any], value: int, field: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise Rejected(RejectionCode.MISSING_FIELD, f"{field} = {value} is not valid") from None


def _transfer_view(tx: Tx, record: TransferRecord) -> admin_pb2.TransferView:
    return admin_pb2.TransferView(
        transfer_id=record.transfer_id,
        direction=record.direction.value,
        partner=record.partner,
        state=int(record.state),  # type: ignore[arg-type]
        quantity=record.quantity,
        authorisation_id=record.authorisation_id,
        blocks=[block_to_pb(b) for b in tx.blocks_of_transfer(record.transfer_id)],
        rejection_code=record.rejection_code,  # type: ignore[arg-type]
        rejection_detail=record.rejection_detail,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        first_transfer=record.first_transfer,
    )


def _get_transfer(engine: Engine, transfer_id: str) -> admin_pb2.TransferView:
    with engine.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
        if record is None:
            raise Rejected(RejectionCode.UNKNOWN_TRANSFER, f"no transfer {transfer_id!r} here")
        return _transfer_view(tx, record)


def _list_transfers(engine: Engine) -> list[admin_pb2.TransferView]:
    with engine.store.transaction() as tx:
        return [_transfer_view(tx, record) for record in tx.transfers()]


def _list_authorisations(engine: Engine) -> list[admin_pb2.AuthorisationView]:
    with engine.store.transaction() as tx:
        views = []
        for terms in tx.authorisations():
            views.append(
                admin_pb2.AuthorisationView(
                    authorisation_id=terms.authorisation_id,
                    version=terms.version,
                    host_party=terms.host_party,
                    activity_id=terms.activity_id,
                    cooperative_approach_id=terms.cooperative_approach_id,
                    vintage_from=terms.vintage_from,
                    vintage_to=terms.vintage_to,
                    quantity_cap=terms.quantity_cap,
                    party_states=tx.authorisation_party_states(
                        terms.host_party, terms.authorisation_id, terms.version
                    ),
                    issued=tx.issued_total(terms.host_party, terms.authorisation_id),
                )
            )
        return views


def _list_holdings(engine: Engine) -> list[admin_pb2.HoldingBlock]:
    with engine.store.transaction() as tx:
        return [
            admin_pb2.HoldingBlock(
                block=block_to_pb(held.block),
                account=held.account,
                status=held.status,
                transfer_id=held.transfer_id or "",
            )
            for held in tx.holdings()
        ]


def _list_adjustments(engine: Engine) -> list[admin_pb2.Adjustment]:
    with engine.store.transaction() as tx:
        return [
            admin_pb2.Adjustment(
                party=record.entry.party,
                partner=record.entry.partner,
                transfer_id=record.entry.transfer_id,
                year=record.entry.year,
                amount=record.entry.amount,
                unit_type=int(record.entry.unit_type),  # type: ignore[arg-type]
                evidence_message_id=record.evidence_message_id,
                recorded_at=timestamp(record.recorded_at),
            )
            for record in tx.adjustments()
        ]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def _engine(self) -> Engine:
        return self._node.engine

    async def _audit(self, operator: str, method: str, request: Any, outcome: str) -> None:
        try:
            text = MessageToJson(request, indent=None)
        except SerializeToJsonError:  # a field JSON cannot state (an out-of-range time)
            text = text_format.MessageToString(request, as_one_line=True)
        await self._node.db(
            self._engine.record_admin_action,
            operator=operator,
            method=method,
            request=text,
            outcome=outcome,
            now=self._node.clock(),
        )

    @admin_method
    async def GetNodeInfo(
        self, request: admin_pb2.GetNodeInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetNodeInfoResponse:
        config = self._node.config
        return admin_pb2.GetNodeInfoResponse(
            party=config.party,
            registry=config.registry,
            partner_address=f"{config.partner_listen.rsplit(':', 1)[0]}:{self._node.partner_port}",
            partners=[
                admin_pb2.PartnerInfo(party=p.party, registry=p.registry, endpoint=p.endpoint)
                for p in self._engine.partners.values()
            ],
            schema_version=await self._node.db(self._engine.store.schema_version),
        )

    @admin_method
    async def Authorise(
        self, request: admin_pb2.AuthoriseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.AuthoriseResponse:
        terms = await self._node.db(
            self._engine.authorise,
            activity_id=request.activity_id,
            activity_name=request.activity_name,
            activity_description=request.activity_description,
            cooperative_approach_id=request.cooperative_approach_id,
            acquiring_parties=list(request.acquiring_parties),
            purposes=[_enum(Purpose, p, "purposes") for p in request.purposes],
            oimp_detail=request.oimp_detail,
            first_transfer_definition=_enum(
                FirstTransferDefinition,
                request.first_transfer_definition,
                "first_transfer_definition",
            ),
            vintage_from=request.vintage_from,
            vintage_to=request.vintage_to,
            quantity_cap=request.quantity_cap,
            unit_type=_enum(UnitType, request.unit_type, "unit_type"),
            now=self._node.clock(),
            buyer_share_bp=request.buyer_share_bp,
            voluntary_omge_bp=request.voluntary_omge_bp,
        )
        self._node.kick_after_call()
        return admin_pb2.AuthoriseResponse(
            authorisation_id=terms.authorisation_id, version=terms.version
        )

    @admin_method
    async def Issue(
        self, request: admin_pb2.IssueRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.IssueResponse:
        issuance_id, blocks = await self._node.db(
            self._engine.issue,
            authorisation_id=request.authorisation_id,
            vintage=request.vintage,
            quantity=request.quantity,
            now=self._node.clock(),
        )
        self._node.kick_after_call()
        return admin_pb2.IssueResponse(
            issuance_id=issuance_id, blocks=[block_to_pb(b) for b in blocks]
        )

    @admin_method
    async def Transfer(
        self, request: admin_pb2.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.TransferResponse:
        import datetime as dt

        transfer_id = await self._node.db(
            self._engine.start_transfer,
            to_party=request.to_party,
            host_party=request.host_party,
            authorisation_id=request.authorisation_id,
            vintage=request.vintage,
            quantity=request.quantity,
            now=self._node.clock(),
            timeout=dt.timedelta(seconds=request.timeout_seconds)
            if request.timeout_seconds
            else None,
        )
        self._node.kick_after_call()
        return admin_pb2.TransferResponse(transfer_id=transfer_id)

    @admin_method
    async def TransferBatch(
        self,
        request: admin_pb2.TransferBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.TransferBatchResponse:
        import datetime as dt

        from itmolink.node.operations import BatchItemRequest

        batch_id, transfer_ids = await self._node.db(
            self._engine.start_transfer_batch,
            to_party=request.to_party,
            items=[
                BatchItemRequest(
                    authorisation_id=item.authorisation_id, vintage=item.vintage,
                    quantity=item.quantity, host_party=item.host_party,
                )
                for item in request.items
            ],
            now=self._node.clock(),
            timeout=dt.timedelta(seconds=request.timeout_seconds)
            if request.timeout_seconds
            else None,
        )  # fmt: skip
        self._node.kick_after_call()
        return admin_pb2.TransferBatchResponse(batch_id=batch_id, transfer_ids=transfer_ids)

    @admin_method
    async def GetTransfer(
        self, request: admin_pb2.GetTransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetTransferResponse:
        view = await self._node.db(_get_transfer, self._engine, request.transfer_id)
        return admin_pb2.GetTransferResponse(transfer=view)

    @admin_method
    async def ListTransfers(
        self, request: admin_pb2.ListTransfersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListTransfersResponse:
        views = await self._node.db(_list_transfers, self._engine)
        return admin_pb2.ListTransfersResponse(transfers=views)

    @admin_method
    async def ListAuthorisations(
        self,
        request: admin_pb2.ListAuthorisationsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.ListAuthorisationsResponse:
        views = await self._node.db(_list_authorisations, self._engine)
        return admin_pb2.ListAuthorisationsResponse(authorisations=views)

    @admin_method
    async def ListHoldings(
        self, request: admin_pb2.ListHoldingsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListHoldingsResponse:
        blocks = await self._node.db(_list_holdings, self._engine)
        return admin_pb2.ListHoldingsResponse(blocks=blocks)

    @admin_method
    async def ListAdjustments(
        self,
        request: admin_pb2.ListAdjustmentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.ListAdjustmentsResponse:
        entries = await self._node.db(_list_adjustments, self._engine)
        return admin_pb2.ListAdjustmentsResponse(adjustments=entries)

    @admin_method
    async def Reconcile(
        self, request: admin_pb2.ReconcileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ReconcileResponse:
        from itmolink.node.reconciliation import DEFAULT_SNAPSHOT_AGE, Reconciliation

        self._engine._require_partner(request.partner)
        snapshot = (
            from_us(timestamp_us(request.snapshot_at))
            if request.HasField("snapshot_at")
            else self._node.clock() - DEFAULT_SNAPSHOT_AGE
        )
        report = await Reconciliation(self._node, request.partner, snapshot).run()
        return _reconcile_response(report)

    @admin_method
    async def RecoverTransfers(
        self,
        request: admin_pb2.RecoverTransfersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.RecoverTransfersResponse:
        from itmolink.node.recovery import recover

        self._engine._require_partner(request.partner)
        snapshot = (
            from_us(timestamp_us(request.snapshot_at))
            if request.HasField("snapshot_at")
            else self._node.clock()
        )
        report = await recover(self._node, request.partner, snapshot)
        response = admin_pb2.RecoverTransfersResponse(
            before=_reconcile_response(report.before),
            transfers=[
                admin_pb2.RecoveredTransfer(
                    transfer_id=t.transfer_id, outcome=t.outcome, partner_state=t.partner_state,
                    detail=t.detail, quantity=t.quantity,
                )
                for t in report.transfers
            ],
        )  # fmt: skip
        if report.after is not None:
            response.after.CopyFrom(_reconcile_response(report.after))
        return response

    @admin_method
    async def ReleaseFrozenBlocks(
        self,
        request: admin_pb2.ReleaseFrozenBlocksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.ReleaseFrozenBlocksResponse:
        released = await self._node.db(self._engine.unfreeze, request.transfer_id, request.reason)
        return admin_pb2.ReleaseFrozenBlocksResponse(
            blocks=[
                admin_pb2.HoldingBlock(
                    block=block_to_pb(held.block), account=held.account, status=held.status
                )
                for held in released
            ]
        )

    @admin_method
    async def RotateSigningKey(
        self,
        request: admin_pb2.RotateSigningKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.RotateSigningKeyResponse:
        key_id = await self._node.db(self._node.rotate_signing_key)
        self._node.kick_after_call()
        return admin_pb2.RotateSigningKeyResponse(key_id=key_id)

    @admin_method
    async def RevokeSigningKey(
        self,
        request: admin_pb2.RevokeSigningKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.RevokeSigningKeyResponse:
        try:
            compromised_since = (
                from_us(timestamp_us(request.compromised_since))
                if request.HasField("compromised_since")
                else None
            )
        except OverflowError:
            raise Rejected(
                RejectionCode.INVALID_FIELD, "compromised_since is out of range"
            ) from None
        await self._node.db(
            self._node.revoke_signing_key, request.key_id, request.partner, compromised_since
        )
        self._node.kick_after_call()
        return admin_pb2.RevokeSigningKeyResponse()

    @admin_method
    async def CancelKeyRotation(
        self,
        request: admin_pb2.CancelKeyRotationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.CancelKeyRotationResponse:
        key_id = await self._node.cancel_key_rotation()
        self._node.kick_after_call()
        return admin_pb2.CancelKeyRotationResponse(key_id=key_id)

    @admin_method
    async def ListSigningKeys(
        self,
        request: admin_pb2.ListSigningKeysRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.ListSigningKeysResponse:
        rows = await self._node.db(self._engine.signing_keys_view)
        views = []
        for party, key_id, status, key in rows:
            view = admin_pb2.SigningKeyView(party=party, key_id=key_id, status=status)
            if key is not None and key.not_before is not None:
                view.not_before.CopyFrom(timestamp(to_us(key.not_before)))
            if key is not None and key.not_after is not None:
                view.not_after.CopyFrom(timestamp(to_us(key.not_after)))
            views.append(view)
        return admin_pb2.ListSigningKeysResponse(keys=views)

    @admin_method
    async def Retire(
        self, request: admin_pb2.RetireRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.RetireResponse:
        account, blocks = await self._node.db(
            self._engine.retire,
            action=request.action,
            host_party=request.host_party or self._node.config.party,
            authorisation_id=request.authorisation_id,
            vintage=request.vintage,
            quantity=request.quantity,
            use_year=request.use_year,
            oimp_purpose=request.oimp_purpose,
            now=self._node.clock(),
        )
        return admin_pb2.RetireResponse(blocks=[block_to_pb(b) for b in blocks], account=account)

    @admin_method
    async def SnapshotHoldings(
        self,
        request: admin_pb2.SnapshotHoldingsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.SnapshotHoldingsResponse:
        taken_now, taken_at, blocks = await self._node.db(
            self._engine.snapshot_holdings, request.year, self._node.clock()
        )
        return admin_pb2.SnapshotHoldingsResponse(
            taken_now=taken_now, taken_at=timestamp(taken_at), blocks=blocks
        )

    @admin_method
    async def AmendAuthorisation(
        self,
        request: admin_pb2.AmendAuthorisationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.AmendAuthorisationResponse:
        changes: dict[str, Any] = {}
        if request.acquiring_parties:
            changes["acquiring_parties"] = frozenset(request.acquiring_parties)
        if request.purposes:
            changes["purposes"] = frozenset(_enum(Purpose, p, "purposes") for p in request.purposes)
        if request.oimp_detail:
            changes["oimp_detail"] = request.oimp_detail
        if request.first_transfer_definition:
            changes["first_transfer_definition"] = _enum(
                FirstTransferDefinition, request.first_transfer_definition,
                "first_transfer_definition",
            )  # fmt: skip
        if request.vintage_from:
            changes["vintage_from"] = request.vintage_from
        if request.vintage_to:
            changes["vintage_to"] = request.vintage_to
        if request.quantity_cap or request.clear_cap:
            changes["quantity_cap"] = 0 if request.clear_cap else request.quantity_cap
        terms = await self._node.db(
            self._engine.amend_authorisation, request.authorisation_id, changes,
            self._node.clock(),
        )  # fmt: skip
        self._node.kick_after_call()
        return admin_pb2.AmendAuthorisationResponse(
            authorisation_id=terms.authorisation_id, version=terms.version
        )

    @admin_method
    async def RevokeAuthorisation(
        self,
        request: admin_pb2.RevokeAuthorisationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb2.RevokeAuthorisationResponse:
        revocation = await self._node.db(
            self._engine.revoke_authorisation, request.authorisation_id, self._node.clock()
        )
        self._node.kick_after_call()
        return admin_pb2.RevokeAuthorisationResponse(
            version=revocation.authorisation.terms.version,
            revoked_quantity=revocation.revoked_quantity,
            refused_quantity=sum(b.quantity for b, _ in revocation.refused),
            unissued_revoked=revocation.unissued_revoked,
        )


def add_admin_service(node: Node, server: grpc.aio.Server) -> None:
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(node), server)


def _reconcile_response(report: Report) -> admin_pb2.ReconcileResponse:
    return admin_pb2.ReconcileResponse(
        reconciliation_id=report.reconciliation_id,
        snapshot_at=timestamp(to_us(report.snapshot_at)),
        discrepancies=[
            admin_pb2.Discrepancy(
                phase=d.phase, subject=d.subject, detail=d.detail, frozen_blocks=d.frozen_blocks
            )
            for d in report.discrepancies
        ],
        queries=report.queries,
        buckets_compared=report.buckets_compared,
        leaves_compared=report.leaves_compared,
        transfers_here=report.transfers_here,
    )
