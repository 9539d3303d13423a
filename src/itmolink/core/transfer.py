"""The two-phase transfer as a pure state machine.

The sender decides. It reserves blocks and proposes; on the receiver's signed
acceptance it debits the blocks and applies its corresponding adjustment in
one step and tells the receiver so (completion); without an acceptance before
the time-out it voids. The receiver accepts or rejects a proposal, and credits
the blocks and applies its own adjustment only on the sender's completion.

One-round transfer (the proposal asks ``complete_on_acceptance``, docs/DESIGN.md):
the receiver completes in the step that accepts, and its acceptance says so; the
sender then completes on that acceptance without sending a completion, and never
voids such a transfer on its own clock: it waits for an answer, or, past the
deadline, withdraws the proposal with a void that settles it only once the receiver
acknowledges it (S7). The receiver
records the acceptance and takes the completion step in one transaction, so its
ACCEPTED state is never seen outside it.

``step`` maps (role, state, event) to the next state and the effects the node
must carry out, all of them in the database transaction that records the
event. Any other combination is a protocol violation and raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from itmolink.core.codes import Rejected, RejectionCode


class Role(enum.Enum):
    SENDER = "out"
    RECEIVER = "in"


class TransferState(enum.IntEnum):
    """Wire values of itmolink.v1.TransferState."""

    PROPOSED = 1
    ACCEPTED = 2
    COMPLETED = 3
    REJECTED = 4
    VOIDED = 5

    @property
    def is_final(self) -> bool:
        return self in (TransferState.COMPLETED, TransferState.REJECTED, TransferState.VOIDED)


class Event(enum.Enum):
    """Facts that move a transfer, named as what happened."""

    # Sender side.
    ACCEPTANCE_RECEIVED = "acceptance received"
    REJECTION_RECEIVED = "rejection received"
    TIMED_OUT = "timed out"
    # An acceptance that says the receiver completed already (one-round transfer).
    COMPLETED_ACCEPTANCE_RECEIVED = "acceptance received, completed by the receiver"
    # The receiver acknowledged the void of a one-round proposal (S7): it had not
    # completed the transfer and, having recorded the void, never will.
    WITHDRAWAL_ACKNOWLEDGED = "void of the one-round proposal acknowledged"
    # Receiver side.
    COMPLETION_RECEIVED = "completion received"
    VOID_RECEIVED = "void received"
    # The receiver accepts a proposal that asks it to complete on acceptance.
    ACCEPTED_TO_COMPLETE = "accepted a proposal that asks to complete on acceptance"
    # The sender answered a status query: it voided, rejected or never knew the
    # transfer, so it will never send a completion.
    ABANDONMENT_REPORTED = "sender reported it will not complete"


class Effect(enum.Enum):
    """What the node must do, atomically with recording the event."""

    DEBIT_RESERVED_BLOCKS = "debit the reserved blocks"
    RELEASE_RESERVED_BLOCKS = "return the reserved blocks to holdings"
    CREDIT_BLOCKS = "credit the blocks to the holding account"
    APPLY_ADJUSTMENT = "apply this party's corresponding adjustment"
    SEND_COMPLETION = "send a TransferCompletion"
    SEND_VOID = "send a TransferVoid"


@dataclass(frozen=True, slots=True)
class Step:
    state: TransferState
    effects: tuple[Effect, ...]


_S, _R = Role.SENDER, Role.RECEIVER
_T = TransferState
_E = Effect

TRANSITIONS: dict[tuple[Role, TransferState, Event], Step] = {
    (_S, _T.PROPOSED, Event.ACCEPTANCE_RECEIVED): Step(
        _T.COMPLETED, (_E.DEBIT_RESERVED_BLOCKS, _E.APPLY_ADJUSTMENT, _E.SEND_COMPLETION)
    ),
    # One-round: the receiver completed when it accepted; no completion is sent.
    (_S, _T.PROPOSED, Event.COMPLETED_ACCEPTANCE_RECEIVED): Step(
        _T.COMPLETED, (_E.DEBIT_RESERVED_BLOCKS, _E.APPLY_ADJUSTMENT)
    ),
    (_S, _T.PROPOSED, Event.REJECTION_RECEIVED): Step(_T.REJECTED, (_E.RELEASE_RESERVED_BLOCKS,)),
    (_S, _T.PROPOSED, Event.TIMED_OUT): Step(_T.VOIDED, (_E.RELEASE_RESERVED_BLOCKS, _E.SEND_VOID)),
    # One-round, S7: the void was sent before (it asks; only the receipt settles).
    (_S, _T.PROPOSED, Event.WITHDRAWAL_ACKNOWLEDGED): Step(
        _T.VOIDED, (_E.RELEASE_RESERVED_BLOCKS,)
    ),
    (_R, _T.ACCEPTED, Event.COMPLETION_RECEIVED): Step(
        _T.COMPLETED, (_E.CREDIT_BLOCKS, _E.APPLY_ADJUSTMENT)
    ),
    # One-round: in the transaction that records the acceptance, the effects of a
    # completion (the same as COMPLETION_RECEIVED's).
    (_R, _T.ACCEPTED, Event.ACCEPTED_TO_COMPLETE): Step(
        _T.COMPLETED, (_E.CREDIT_BLOCKS, _E.APPLY_ADJUSTMENT)
    ),
    (_R, _T.ACCEPTED, Event.VOID_RECEIVED): Step(_T.VOIDED, ()),
    (_R, _T.ACCEPTED, Event.ABANDONMENT_REPORTED): Step(_T.VOIDED, ()),
    # The sender voids a proposal it never saw answered; if the receiver had
    # rejected it, the rejection stands and nothing changes.
    (_R, _T.REJECTED, Event.VOID_RECEIVED): Step(_T.REJECTED, ()),
}


def step(role: Role, state: TransferState, event: Event) -> Step:
    """The next state and effects, or TRANSFER_STATE_CONFLICT."""
    found = TRANSITIONS.get((role, state, event))
    if found is None:
        raise Rejected(
            RejectionCode.TRANSFER_STATE_CONFLICT,
            f"a {role.name.lower()} cannot take '{event.value}' in state {state.name}",
        )
    return found
