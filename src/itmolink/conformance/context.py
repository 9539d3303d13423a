"""What the kit's tests share during one run: the link, the server, the driver,
and the kit's own record of every transfer it made or saw final at the target
(against which stage 4 reconciles the target's ledger)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from itmolink.conformance.config import KitConfig
from itmolink.conformance.driver import Driver
from itmolink.conformance.link import KitServer, Link, Reply, sha256
from itmolink.core.blocks import Block
from itmolink.core.codes import wire_name_of as code_name
from itmolink.core.reconcile import TransferFacts, blocks_leaf, journal_leaf
from itmolink.core.units import UnitType
from itmolink.node.base import Rejection
from itmolink.node.convert import block_to_pb, timestamp, timestamp_us, to_us
from itmolink.v1 import authorisation_pb2, common_pb2, issuance_pb2, transfer_pb2


class CheckFailed(AssertionError):
    """A conformance test found the target breaking the rule it checks."""


class NotRunnable(Exception):
    """A test needs what an earlier test should have set up, and that test failed."""


def other_party(*avoid: str) -> str:
    """A party code that is none of ``avoid`` (for messages addressed elsewhere)."""
    return next(code for code in ("ZZZ", "ZZY", "ZZX") if code not in avoid)


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class KitTransfer:
    """A transfer between the kit and the target, as the kit records it."""

    transfer_id: str
    sender: str
    receiver: str
    authorisation_id: str
    blocks: tuple[Block, ...] = ()
    moved: bool = False
    # Whether the target must hold it as final (in its reconciliation snapshot).
    final_at_target: bool = False
    voided: bool = False  # final as VOIDED (else, final and not moved: REJECTED)
    # The proposal's sent_at (µs): the time that places it in snapshots (§11.1).
    proposed_at_us: int = 0
    proposal_digest: bytes = b""
    acceptance_digest: bytes = b""
    # Whether the transfer carries corresponding adjustments: not for units whose first
    # transfer is their use (§5.5.3, §6.6), which a first-transfer notice adjusts later.
    adjusted: bool = True
    # Whether its proposal asked the receiver to complete on acceptance (PROTOCOL §6.11).
    one_round: bool = False

    def facts(
        self,
        adjustments: tuple[tuple[int, int], ...] | None = None,
        receiver_adjustments: tuple[tuple[int, int], ...] | None = None,
    ) -> TransferFacts:
        """The transfer's facts (§11.4). ``adjustments``: the sender's pairs, and
        ``receiver_adjustments`` the receiver's, when not the expected ones (the
        receiver's default to the negatives of the sender's)."""
        if adjustments is None:
            adjustments = self.expected_adjustments()
        if receiver_adjustments is None:
            receiver_adjustments = tuple(sorted((y, -a) for y, a in adjustments))
        return TransferFacts(
            transfer_id=self.transfer_id,
            sender=self.sender,
            receiver=self.receiver,
            moved=self.moved,
            blocks=self.blocks if self.moved else (),
            sender_adjustments=adjustments if self.moved else (),
            receiver_adjustments=receiver_adjustments if self.moved else (),
            proposal_digest=self.proposal_digest,
            acceptance_digest=self.acceptance_digest,
        )

    def expected_adjustments(self) -> tuple[tuple[int, int], ...]:
        """One entry per vintage, the quantity as the sender books it (§6.6, §11.4),
        for a transfer that carries adjustments; the receiver books the negatives."""
        if not self.adjusted:
            return ()
        by_year: dict[int, int] = {}
        for block in self.blocks:
            by_year[block.vintage] = by_year.get(block.vintage, 0) + block.quantity
        return tuple(sorted(by_year.items()))

    def blocks_leaf(self) -> bytes:
        return blocks_leaf(self.facts())

    def journal_leaf(self) -> bytes:
        return journal_leaf(self.facts())


@dataclass
class Context:
    config: KitConfig
    link: Link
    server: KitServer
    driver: Driver
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:8].upper())
    transfers: dict[str, KitTransfer] = field(default_factory=dict)
    # Authorisation ids created in this run (the kit's or the target's).
    authorisations: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    _serial: int = 0
    _transfer_counter: int = 0

    def __post_init__(self) -> None:
        # Serial numbers of this run: far from any earlier run's (T4 refuses serials held).
        self._serial = int(time.time() * 1000) * 1000

    def needs(self, note: str, test_id: str) -> Any:
        """What test ``test_id`` left in the notes for later tests; when it is missing
        (that test failed), the test asking is reported as not run."""
        if note not in self.notes:
            raise NotRunnable(f"needs {test_id}, which did not pass")
        return self.notes[note]

    @property
    def kit(self) -> str:
        return self.config.party

    @property
    def target(self) -> str:
        return self.config.target_party

    # -- the kit as host (role buyer) ----------------------------------------------------

    def new_transfer_id(self) -> str:
        self._transfer_counter += 1
        return f"{self.kit}-T-{self.nonce}-{self._transfer_counter:04d}"

    def new_blocks(self, quantity: int, authorisation: str, *, vintage: int = 2025) -> list[Block]:
        start = self._serial + 1
        self._serial += quantity + 1000
        terms = self.authorisations[authorisation]
        return [
            Block(
                originating_registry=self.config.registry,
                serial_start=start,
                serial_end=start + quantity - 1,
                unit_type=UnitType.ITMO,
                vintage=vintage,
                activity_id=terms.activity.activity_id,
                authorisation_id=authorisation,
                cooperative_approach_id=terms.cooperative_approach_id,
                first_transferring_party=self.kit,
            )
        ]

    def statement(self, suffix: str, **overrides: Any) -> authorisation_pb2.AuthorisationStatement:
        fields: dict[str, Any] = dict(
            authorisation_id=f"{self.kit}-A-{self.nonce}-{suffix}",
            version=1,
            host_party=self.kit,
            activity=authorisation_pb2.Activity(
                activity_id=f"{self.kit}-CONFORMANCE", name="conformance kit activity"
            ),
            cooperative_approach_id=f"{self.kit}-{self.target}-CONFORMANCE",
            acquiring_parties=[self.target],
            purposes=[common_pb2.PURPOSE_NDC],
            vintage_from=2021,
            vintage_to=2030,
            unit_type=common_pb2.UNIT_TYPE_ITMO,
        )
        fields.update(overrides)
        return authorisation_pb2.AuthorisationStatement(**fields)

    def issuance(self, issuance_id: str, blocks: list[Block]) -> issuance_pb2.IssuanceNotice:
        return issuance_pb2.IssuanceNotice(
            issuance_id=issuance_id,
            authorisation_id=blocks[0].authorisation_id,
            blocks=[block_to_pb(b) for b in blocks],
            quantity=sum(b.quantity for b in blocks),
        )

    def proposal(
        self,
        blocks: list[Block],
        *,
        transfer_id: str | None = None,
        expires_in: dt.timedelta = dt.timedelta(minutes=10),
        **overrides: Any,
    ) -> transfer_pb2.TransferProposal:
        expires = dt.datetime.now(dt.UTC) + expires_in
        fields: dict[str, Any] = dict(
            transfer_id=transfer_id or self.new_transfer_id(),
            authorisation_id=blocks[0].authorisation_id if blocks else "",
            quantity=sum(b.quantity for b in blocks),
            blocks=[block_to_pb(b) for b in blocks],
            first_transfer=True,
            expires_at=timestamp(to_us(expires)),
        )
        fields.update(overrides)
        return transfer_pb2.TransferProposal(**fields)

    def record_outgoing(
        self, proposal: transfer_pb2.TransferProposal, payload: bytes, blocks: list[Block]
    ) -> KitTransfer:
        record = KitTransfer(
            transfer_id=proposal.transfer_id,
            sender=self.kit,
            receiver=self.target,
            authorisation_id=proposal.authorisation_id,
            blocks=tuple(blocks),
            proposal_digest=sha256(payload),
            proposed_at_us=timestamp_us(proposal.header.sent_at),
            one_round=proposal.complete_on_acceptance,
        )
        self.transfers[record.transfer_id] = record
        return record

    # -- replies -----------------------------------------------------------------------

    def expect(self, reply: Reply, cls: type[Message], what: str) -> Any:
        """The reply is a well-formed, correctly signed ``cls`` answering the request."""
        check(reply.ok, f"{what}: expected {cls.__name__}, got {reply.describe()}")
        check(not reply.problems, f"{what}: the reply breaks §5.3: {'; '.join(reply.problems)}")
        check(
            isinstance(reply.message, cls),
            f"{what}: expected {cls.__name__}, got {reply.describe()}",
        )
        header = reply.message.header  # type: ignore[union-attr]
        check(header.sequence >= 1, f"{what}: a recorded reply has sequence >= 1 (§4.3)")
        return reply.message

    def expect_rejection(
        self, reply: Reply, code: int, what: str, *, recorded: bool | None = None
    ) -> Rejection:
        """The reply is a signed Rejection with ``code`` bound to the request (§5.4)."""
        name = f"{code_name(code)} ({code})"
        check(reply.ok, f"{what}: expected a signed Rejection {name}, got {reply.describe()}")
        check(not reply.problems, f"{what}: the reply breaks §5.3: {'; '.join(reply.problems)}")
        check(
            isinstance(reply.message, Rejection),
            f"{what}: expected Rejection {name}, got {reply.describe()}",
        )
        assert isinstance(reply.message, Rejection)
        codes = reply.rejection_codes
        check(codes and codes[0] == code, f"{what}: expected {name}, got {reply.describe()}")
        if recorded is False:
            check(
                reply.message.header.sequence == 0,
                f"{what}: a refusal before recording carries sequence 0 (§5.2), "
                f"got {reply.message.header.sequence}",
            )
        if recorded is True:
            check(
                reply.message.header.sequence >= 1,
                f"{what}: a recorded Rejection carries a sequence >= 1 (§5.2 D11)",
            )
        return reply.message
