"""An onward transfer: Korea passes units first transferred by Lao PDR to Japan,
whose registry never heard from Lao PDR about them and checks the host's own
signed authorisation statement carried with the proposal."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.crypto.envelope import TrustStore
from itmolink.crypto.keys import SigningKey
from itmolink.node.engine import Engine, Partner
from itmolink.store.tx import Tx

from ..conftest import Databases
from .conftest import START

PARTIES = ("LAO", "KOR", "JPN")


def _ids(party: str) -> Callable[[], str]:
    """Message ids of ``party``: its name and a counter of its own."""
    counter = itertools.count(1)
    return lambda: f"{party}-{next(counter)}"


def network(databases: Databases) -> dict[str, Engine]:
    keys = {p: SigningKey.generate(p) for p in PARTIES}
    engines = {}
    for party in PARTIES:
        others = [p for p in PARTIES if p != party]
        engines[party] = Engine(
            party=party, registry=f"{party}-NR", signing_key=keys[party],
            trust=TrustStore(keys[p].verifying_key() for p in others),
            partners=[Partner(p, f"{p}-NR", "x") for p in others],
            store=databases.open(party),
            new_id=_ids(party),
        )  # fmt: skip
    return engines


def pump(engines: dict[str, Engine], now: dt.datetime, *, blocked: set[tuple[str, str]]) -> None:
    for _ in range(20):
        moved = False
        for sender, engine in engines.items():
            for message_id, receiver, envelope in engine.due_messages(now):
                if (sender, receiver) in blocked:
                    engine.delivery_failed(message_id, "blocked", now)
                    continue
                reply = engines[receiver].handle_delivery(sender, envelope, now)
                engine.handle_reply(message_id, reply, now)
                moved = True
        if not moved:
            return


def test_units_move_on_to_a_third_party_with_the_hosts_evidence(databases: Databases) -> None:
    engines = network(databases)
    lao, kor, jpn = engines["LAO"], engines["KOR"], engines["JPN"]
    now = START
    blocked = {("LAO", "JPN")}  # JPN never hears from LAO directly
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR-JPN", acquiring_parties=["KOR", "JPN"],
        purposes=[Purpose.NDC], oimp_detail="",
        first_transfer_definition=FirstTransferDefinition.UNSPECIFIED, vintage_from=2021,
        vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    authorisation_id = terms.authorisation_id
    lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=now)
    pump(engines, now, blocked=blocked)
    first = lao.start_transfer(to_party="KOR", authorisation_id=authorisation_id, vintage=2025,
                               quantity=600, now=now)  # fmt: skip
    pump(engines, now, blocked=blocked)

    onward = kor.start_transfer(
        to_party="JPN", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=250, now=now,
    )  # fmt: skip
    pump(engines, now, blocked=blocked)

    def state(engine: Engine, transfer_id: str) -> TransferState | None:
        with engine.store.transaction() as tx:
            record = tx.transfer_get(transfer_id)
        return None if record is None else record.state

    assert state(kor, first) is state(kor, onward) is TransferState.COMPLETED
    assert state(jpn, onward) is TransferState.COMPLETED
    with kor.store.transaction() as tx:
        assert not tx.transfer_get(onward).first_transfer  # type: ignore[union-attr]
        kor_ca = sorted((a.entry.transfer_id, a.entry.amount) for a in tx.adjustments())
    with jpn.store.transaction() as tx:
        jpn_ca = [(a.entry.transfer_id, a.entry.amount) for a in tx.adjustments()]
        jpn_held = [(h.block.first_transferring_party, h.block.quantity) for h in tx.holdings()]
        assert tx.authorisation_get("LAO", authorisation_id) is not None  # learnt from evidence
    # KOR subtracted 600 on acquisition and adds back the 250 it passed on.
    assert kor_ca == sorted([(first, -600), (onward, 250)])
    assert jpn_ca == [(onward, -250)]
    assert jpn_held == [("LAO", 250)]


def test_an_onward_transfer_to_a_party_the_host_did_not_authorise_is_refused(
    databases: Databases,
) -> None:
    engines = network(databases)
    lao, kor = engines["LAO"], engines["KOR"]
    now = START
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR", acquiring_parties=["KOR"],  # JPN not authorised
        purposes=[Purpose.NDC], oimp_detail="",
        first_transfer_definition=FirstTransferDefinition.UNSPECIFIED, vintage_from=2021,
        vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    lao.issue(authorisation_id=terms.authorisation_id, vintage=2025, quantity=100, now=now)
    pump(engines, now, blocked=set())
    lao.start_transfer(to_party="KOR", authorisation_id=terms.authorisation_id, vintage=2025,
                       quantity=100, now=now)  # fmt: skip
    pump(engines, now, blocked=set())
    with pytest.raises(Rejected) as caught:
        kor.start_transfer(to_party="JPN", host_party="LAO",
                           authorisation_id=terms.authorisation_id, vintage=2025, quantity=10,
                           now=now)  # fmt: skip
    assert caught.value.code is RejectionCode.NOT_ACQUIRING_PARTY


def test_a_third_party_refuses_an_onward_transfer_without_the_hosts_evidence(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = network(databases)
    lao, kor, jpn = engines["LAO"], engines["KOR"], engines["JPN"]
    now = START
    blocked = {("LAO", "JPN")}
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR-JPN", acquiring_parties=["KOR", "JPN"],
        purposes=[Purpose.NDC], oimp_detail="",
        first_transfer_definition=FirstTransferDefinition.UNSPECIFIED, vintage_from=2021,
        vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    lao.issue(authorisation_id=terms.authorisation_id, vintage=2025, quantity=100, now=now)
    pump(engines, now, blocked=blocked)
    lao.start_transfer(to_party="KOR", authorisation_id=terms.authorisation_id, vintage=2025,
                       quantity=100, now=now)  # fmt: skip
    pump(engines, now, blocked=blocked)
    monkeypatch.setattr(Tx, "authorisation_evidence", lambda self, host, auth: None)
    onward = kor.start_transfer(to_party="JPN", host_party="LAO",
                                authorisation_id=terms.authorisation_id, vintage=2025,
                                quantity=10, now=now)  # fmt: skip
    pump(engines, now, blocked=blocked)
    with kor.store.transaction() as tx:
        record = tx.transfer_get(onward)
    assert record is not None
    assert record.state is TransferState.REJECTED
    assert record.rejection_code == RejectionCode.UNKNOWN_AUTHORISATION
    with jpn.store.transaction() as tx:
        assert tx.adjustments() == []


def test_a_party_removed_by_an_amendment_is_told_and_can_no_longer_acquire(
    databases: Databases,
) -> None:
    engines = network(databases)
    lao, kor, jpn = engines["LAO"], engines["KOR"], engines["JPN"]
    now = START
    terms = lao.authorise(
        activity_id="LAO-SOLAR", activity_name="", activity_description="",
        cooperative_approach_id="LAO-KOR-JPN", acquiring_parties=["KOR", "JPN"],
        purposes=[Purpose.NDC], oimp_detail="",
        first_transfer_definition=FirstTransferDefinition.UNSPECIFIED, vintage_from=2021,
        vintage_to=2030, quantity_cap=0, unit_type=UnitType.ITMO, now=now,
    )  # fmt: skip
    authorisation_id = terms.authorisation_id
    lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=now)
    pump(engines, now, blocked=set())

    amended = lao.amend_authorisation(
        authorisation_id, {"acquiring_parties": frozenset({"KOR"})}, now
    )
    assert amended.acquiring_parties == {"KOR"}
    with lao.store.transaction() as tx:
        waiting = tx.authorisation_party_states("LAO", authorisation_id, 2)
    assert waiting == {"KOR": "pending", "JPN": "pending"}  # JPN is told of its removal
    pump(engines, now, blocked=set())
    with lao.store.transaction() as tx:
        answered = tx.authorisation_party_states("LAO", authorisation_id, 2)
    assert answered == {"KOR": "acknowledged", "JPN": "acknowledged"}
    with jpn.store.transaction() as tx:
        recorded = tx.authorisation_get("LAO", authorisation_id)
    assert recorded is not None
    assert (recorded.version, recorded.acquiring_parties) == (2, frozenset({"KOR"}))

    # The host no longer proposes to JPN, and JPN would refuse a proposal under it.
    with pytest.raises(Rejected) as caught:
        lao.start_transfer(to_party="JPN", authorisation_id=authorisation_id, vintage=2025,
                           quantity=10, now=now)  # fmt: skip
    assert caught.value.code is RejectionCode.NOT_ACQUIRING_PARTY
    kor_transfer = lao.start_transfer(to_party="KOR", authorisation_id=authorisation_id,
                                      vintage=2025, quantity=10, now=now)  # fmt: skip
    pump(engines, now, blocked=set())
    with kor.store.transaction() as tx:
        record = tx.transfer_get(kor_transfer)
    assert record is not None
    assert record.state is TransferState.COMPLETED
