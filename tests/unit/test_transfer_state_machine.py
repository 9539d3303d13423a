"""The two-phase transfer state machine: every allowed step, and every forbidden one."""

from __future__ import annotations

import itertools

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TRANSITIONS, Effect, Event, Role, Step, TransferState, step

S, R = Role.SENDER, Role.RECEIVER
T = TransferState
E = Effect

# The protocol, written out independently of TRANSITIONS so a change to either shows up here.
EXPECTED: dict[tuple[Role, TransferState, Event], Step] = {
    (S, T.PROPOSED, Event.ACCEPTANCE_RECEIVED): Step(
        T.COMPLETED, (E.DEBIT_RESERVED_BLOCKS, E.APPLY_ADJUSTMENT, E.SEND_COMPLETION)
    ),
    # One-round transfer: the receiver completed on acceptance; no completion to send.
    (S, T.PROPOSED, Event.COMPLETED_ACCEPTANCE_RECEIVED): Step(
        T.COMPLETED, (E.DEBIT_RESERVED_BLOCKS, E.APPLY_ADJUSTMENT)
    ),
    (S, T.PROPOSED, Event.REJECTION_RECEIVED): Step(T.REJECTED, (E.RELEASE_RESERVED_BLOCKS,)),
    (S, T.PROPOSED, Event.TIMED_OUT): Step(T.VOIDED, (E.RELEASE_RESERVED_BLOCKS, E.SEND_VOID)),
    # One-round transfer, S7: the receiver's receipt of the void (sent before) settles it.
    (S, T.PROPOSED, Event.WITHDRAWAL_ACKNOWLEDGED): Step(T.VOIDED, (E.RELEASE_RESERVED_BLOCKS,)),
    (R, T.ACCEPTED, Event.COMPLETION_RECEIVED): Step(
        T.COMPLETED, (E.CREDIT_BLOCKS, E.APPLY_ADJUSTMENT)
    ),
    # One-round transfer: the receiver completes in the transaction that accepts.
    (R, T.ACCEPTED, Event.ACCEPTED_TO_COMPLETE): Step(
        T.COMPLETED, (E.CREDIT_BLOCKS, E.APPLY_ADJUSTMENT)
    ),
    (R, T.ACCEPTED, Event.VOID_RECEIVED): Step(T.VOIDED, ()),
    # The sender answered a status query with VOIDED, REJECTED or UNKNOWN.
    (R, T.ACCEPTED, Event.ABANDONMENT_REPORTED): Step(T.VOIDED, ()),
    # A void for a proposal the receiver had already rejected: the rejection stands.
    (R, T.REJECTED, Event.VOID_RECEIVED): Step(T.REJECTED, ()),
}

ALL = list(itertools.product(Role, TransferState, Event))
FORBIDDEN = [key for key in ALL if key not in EXPECTED]


def key_id(key: tuple[Role, TransferState, Event]) -> str:
    role, state, event = key
    return f"{role.name}-{state.name}-{event.name}"


def test_transitions_table_is_exactly_the_protocol() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(
    ("key", "expected"), list(EXPECTED.items()), ids=[key_id(k) for k in EXPECTED]
)
def test_allowed_step(key: tuple[Role, TransferState, Event], expected: Step) -> None:
    assert step(*key) == expected


def test_forbidden_combinations_cover_the_rest_of_the_product() -> None:
    assert len(ALL) == len(Role) * len(TransferState) * len(Event)
    assert len(FORBIDDEN) == len(ALL) - len(EXPECTED)


@pytest.mark.parametrize("key", FORBIDDEN, ids=[key_id(k) for k in FORBIDDEN])
def test_forbidden_step_is_a_state_conflict(key: tuple[Role, TransferState, Event]) -> None:
    with pytest.raises(Rejected) as excinfo:
        step(*key)
    assert excinfo.value.code is RejectionCode.TRANSFER_STATE_CONFLICT


def test_final_states() -> None:
    assert {s for s in TransferState if s.is_final} == {T.COMPLETED, T.REJECTED, T.VOIDED}


@pytest.mark.parametrize("state", [s for s in TransferState if s.is_final], ids=lambda s: s.name)
def test_nothing_leaves_a_final_state(state: TransferState) -> None:
    # A final state may absorb a late message (an effect-free self-loop) but never changes.
    for role, event in itertools.product(Role, Event):
        if (role, state, event) in TRANSITIONS:
            assert step(role, state, event) == Step(state, ()), (role, event)
        else:
            with pytest.raises(Rejected) as excinfo:
                step(role, state, event)
            assert excinfo.value.code is RejectionCode.TRANSFER_STATE_CONFLICT


def test_only_one_final_state_absorbs_a_message() -> None:
    absorbing = [key for key in TRANSITIONS if key[1].is_final]
    assert absorbing == [(R, T.REJECTED, Event.VOID_RECEIVED)]


def test_every_transition_ends_in_a_final_state() -> None:
    assert all(s.state.is_final for s in TRANSITIONS.values())


def test_apply_adjustment_only_on_transitions_into_completed() -> None:
    for key, found in TRANSITIONS.items():
        applies = E.APPLY_ADJUSTMENT in found.effects
        assert applies == (found.state is T.COMPLETED), key


def test_units_move_only_on_completion() -> None:
    for key, found in TRANSITIONS.items():
        moves = {E.DEBIT_RESERVED_BLOCKS, E.CREDIT_BLOCKS} & set(found.effects)
        if found.state is T.COMPLETED:
            # The sender debits, the receiver credits; never both, never neither.
            assert moves == ({E.DEBIT_RESERVED_BLOCKS} if key[0] is S else {E.CREDIT_BLOCKS})
        else:
            assert moves == set(), key


def test_sender_releases_its_reservation_whenever_it_does_not_debit() -> None:
    for (role, _, _), found in TRANSITIONS.items():
        if role is S:
            debits = E.DEBIT_RESERVED_BLOCKS in found.effects
            releases = E.RELEASE_RESERVED_BLOCKS in found.effects
            assert debits != releases


def test_events_belong_to_one_role() -> None:
    sender_events = {event for role, _, event in TRANSITIONS if role is S}
    receiver_events = {event for role, _, event in TRANSITIONS if role is R}
    assert sender_events == {
        Event.ACCEPTANCE_RECEIVED,
        Event.COMPLETED_ACCEPTANCE_RECEIVED,
        Event.REJECTION_RECEIVED,
        Event.TIMED_OUT,
        Event.WITHDRAWAL_ACKNOWLEDGED,
    }
    assert receiver_events == {
        Event.COMPLETION_RECEIVED,
        Event.ACCEPTED_TO_COMPLETE,
        Event.VOID_RECEIVED,
        Event.ABANDONMENT_REPORTED,
    }


def test_the_one_round_steps_are_the_two_phase_completions_without_a_completion_sent() -> None:
    """The one-round transfer changes no effect: the sender's step is its acceptance
    step less SEND_COMPLETION, the receiver's is its completion step."""
    two_phase = TRANSITIONS[(S, T.PROPOSED, Event.ACCEPTANCE_RECEIVED)]
    one_round = TRANSITIONS[(S, T.PROPOSED, Event.COMPLETED_ACCEPTANCE_RECEIVED)]
    assert one_round == Step(
        two_phase.state, tuple(e for e in two_phase.effects if e is not E.SEND_COMPLETION)
    )
    assert (
        TRANSITIONS[(R, T.ACCEPTED, Event.ACCEPTED_TO_COMPLETE)]
        == TRANSITIONS[(R, T.ACCEPTED, Event.COMPLETION_RECEIVED)]
    )


def test_a_withdrawn_one_round_transfer_is_voided_only_on_the_receipt_and_sends_nothing() -> None:
    """S7: the void that withdraws a one-round proposal was sent while the transfer
    stayed PROPOSED; the receiver's receipt settles it as a time-out would, with no
    second void, and nothing but that receipt does."""
    timed_out = TRANSITIONS[(S, T.PROPOSED, Event.TIMED_OUT)]
    assert step(S, T.PROPOSED, Event.WITHDRAWAL_ACKNOWLEDGED) == Step(
        timed_out.state, tuple(e for e in timed_out.effects if e is not E.SEND_VOID)
    )
    for state in (T.COMPLETED, T.REJECTED, T.VOIDED):
        assert (S, state, Event.WITHDRAWAL_ACKNOWLEDGED) not in TRANSITIONS


def test_no_transition_repeats_an_effect() -> None:
    for found in TRANSITIONS.values():
        assert len(set(found.effects)) == len(found.effects)
