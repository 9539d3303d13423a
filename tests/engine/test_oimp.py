"""When the host's adjustment is booked follows the authorisation's definition of
the first transfer (decision 2/CMA.3, annex, paragraph 2(b))."""

from __future__ import annotations

import pytest

from itmolink.core.accounting import HostThreshold
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.crypto.keys import SigningKey

from ..conftest import Databases
from .conftest import Pair, make_engine
from .test_accounting_wiring import averaging


def ledger(engine: object) -> list[tuple[str, int]]:
    with engine.store.transaction() as tx:  # type: ignore[attr-defined]
        return [(a.entry.transfer_id, a.entry.amount) for a in tx.adjustments()]


def authorise(pair: Pair, purposes: list[Purpose], definition: FirstTransferDefinition) -> str:
    return pair.authorise(
        purposes=purposes,
        oimp_detail="CORSIA" if Purpose.OIMP in purposes else "",
        first_transfer_definition=definition,
    )


def issue_and_transfer(pair: Pair, authorisation_id: str) -> tuple[str, str]:
    pair.pump()
    issuance_id, _ = pair.lao.issue(
        authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now
    )
    pair.pump()
    transfer_id = pair.lao.start_transfer(
        to_party="KOR", authorisation_id=authorisation_id, vintage=2025, quantity=400,
        now=pair.now,
    )  # fmt: skip
    pair.pump()
    return issuance_id, transfer_id


def test_ndc_units_are_adjusted_at_the_first_international_transfer(pair: Pair) -> None:
    authorisation_id = authorise(pair, [Purpose.NDC], FirstTransferDefinition.UNSPECIFIED)
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    assert ledger(pair.lao) == [(transfer_id, 400)]
    assert ledger(pair.kor) == [(transfer_id, -400)]


@pytest.mark.parametrize(
    "definition",
    [FirstTransferDefinition.AT_ISSUANCE, FirstTransferDefinition.AT_AUTHORISATION],
)
def test_oimp_units_first_transferred_at_issuance_are_adjusted_by_the_host_then(
    pair: Pair, definition: FirstTransferDefinition
) -> None:
    authorisation_id = authorise(pair, [Purpose.OIMP], definition)
    issuance_id, transfer_id = issue_and_transfer(pair, authorisation_id)
    # The host added all 1,000 at issuance; the later transfer is no first
    # transfer, and KOR, holding OIMP-only units, books nothing.
    assert ledger(pair.lao) == [(issuance_id, 1_000)]
    assert ledger(pair.kor) == []
    with pair.lao.store.transaction() as tx:
        record = tx.transfer_get(transfer_id)
    assert record is not None
    assert not record.first_transfer


def test_oimp_units_first_transferred_at_use_are_adjusted_when_the_host_uses_them(
    pair: Pair,
) -> None:
    authorisation_id = authorise(
        pair, [Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION
    )
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now)
    assert ledger(pair.lao) == []
    pair.lao.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=300, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    [(reference, amount)] = ledger(pair.lao)
    assert amount == 300
    assert reference.startswith("use:")


def test_units_for_both_purposes_are_first_transferred_at_the_international_transfer(
    pair: Pair,
) -> None:
    """With NDC among the purposes, the NDC rule decides: the first international
    transfer, booked by both parties in the same transfer (equal and opposite)."""
    authorisation_id = authorise(
        pair, [Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE
    )
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    assert ledger(pair.lao) == [(transfer_id, 400)]
    assert ledger(pair.kor) == [(transfer_id, -400)]


@pytest.mark.parametrize("definition", list(FirstTransferDefinition)[1:])
def test_the_hosts_own_oimp_use_of_units_for_both_purposes_is_their_first_transfer(
    pair: Pair, definition: FirstTransferDefinition
) -> None:
    """Units for both purposes are adjusted at their first international transfer,
    whatever the OIMP definition (decision 26), so the host never adjusted those it kept:
    its own use of them for OIMP is their first transfer, +quantity, under any
    definition (decision 59); units it already transferred are not booked again."""
    authorisation_id = authorise(pair, [Purpose.NDC, Purpose.OIMP], definition)
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    pair.lao.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=250, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    [transferred, (reference, amount)] = ledger(pair.lao)
    assert transferred == (transfer_id, 400)
    assert amount == 250
    assert reference.startswith("use:")


def test_an_acquiring_partys_oimp_use_of_units_for_both_purposes_gives_its_adjustment_back(
    pair: Pair,
) -> None:
    """KOR subtracted the 400 it acquired (they may count toward its NDC); used for OIMP
    they count toward no NDC of its own, so it adds back what it uses, as at an onward
    transfer (decision 59). The host's booking stands."""
    authorisation_id = authorise(
        pair, [Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE
    )
    _, transfer_id = issue_and_transfer(pair, authorisation_id)
    pair.kor.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=150, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    pair.pump()
    [acquired, (reference, amount)] = ledger(pair.kor)
    assert acquired == (transfer_id, -400)
    assert amount == 150
    assert reference.startswith("return:")
    assert ledger(pair.lao) == [(transfer_id, 400)]  # no notice: nothing more at the host


def test_an_acquiring_partys_give_back_is_no_first_transfer_of_its_own(
    databases: Databases,
) -> None:
    """KOR's give-back at its OIMP use does not count against KOR's own host threshold:
    it first-transferred nothing (decision 59)."""
    keys = {p: SigningKey.generate(p) for p in ("LAO", "KOR")}
    lao = make_engine(databases, "LAO", "KOR", keys, keys["KOR"], accounting=averaging("LAO"))
    kor = make_engine(
        databases, "KOR", "LAO", keys, keys["LAO"], accounting=averaging("KOR"),
        threshold=HostThreshold(per_year=200),
    )  # fmt: skip
    pair = Pair(lao=lao, kor=kor, keys=keys)
    authorisation_id = authorise(
        pair, [Purpose.NDC, Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE
    )
    issue_and_transfer(pair, authorisation_id)
    kor.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=150, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    with kor.store.transaction() as tx:
        assert tx.first_transferred_by_year() == {}


def test_an_acquiring_party_gives_back_only_what_it_subtracted(pair: Pair) -> None:
    """Units acquired while their authorisation was for OIMP only carried no -CA at KOR;
    used for OIMP after an amendment added NDC, KOR gives nothing back."""
    authorisation_id = authorise(
        pair, [Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION
    )
    issue_and_transfer(pair, authorisation_id)
    assert ledger(pair.kor) == []
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    pair.kor.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=400, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    pair.pump()
    assert ledger(pair.kor) == []


def test_the_host_does_not_use_units_booked_at_issuance_with_units_never_adjusted(
    pair: Pair,
) -> None:
    """OIMP only, first transferred at issuance: the first 1,000 are booked then; an
    amendment adds NDC and 1,000 more are issued, never adjusted. One use for OIMP of
    both kinds would leave the second kind unbooked: refused (4013), as a transfer is."""
    authorisation_id = authorise(pair, [Purpose.OIMP], FirstTransferDefinition.AT_ISSUANCE)
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now)
    pair.pump()
    pair.lao.amend_authorisation(
        authorisation_id, {"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, pair.now
    )
    pair.pump()
    pair.lao.issue(authorisation_id=authorisation_id, vintage=2025, quantity=1_000, now=pair.now)
    pair.pump()
    with pytest.raises(Rejected) as refused:
        pair.lao.retire(
            action="use-oimp", host_party="LAO", authorisation_id=authorisation_id,
            vintage=2025, quantity=1_500, oimp_purpose="CORSIA", now=pair.now,
        )  # fmt: skip
    assert refused.value.code is RejectionCode.ALREADY_FIRST_TRANSFERRED


def test_a_buyers_use_of_oimp_units_is_their_first_transfer_booked_by_the_host(
    pair: Pair,
) -> None:
    authorisation_id = authorise(
        pair, [Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION
    )
    issue_and_transfer(pair, authorisation_id)
    assert ledger(pair.lao) == []  # the international transfer is not the first transfer
    assert ledger(pair.kor) == []
    pair.kor.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=100, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    pair.pump()  # the notice reaches LAO, which books its first transfer
    [(reference, amount)] = ledger(pair.lao)
    assert (reference.startswith("KOR-U-"), amount) == (True, 100)
    assert ledger(pair.kor) == []
    with pair.lao.store.transaction() as tx:
        [record] = tx.adjustments()
    assert record.entry.partner == "KOR"
    assert record.evidence_message_id  # the notice, signed by KOR


def test_a_notice_for_serials_already_first_transferred_is_refused(pair: Pair) -> None:
    from itmolink.core.codes import RejectionCode
    from itmolink.v1 import use_pb2

    from .test_limits import code, deliver_from, header

    authorisation_id = authorise(
        pair, [Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION
    )
    issue_and_transfer(pair, authorisation_id)
    pair.kor.retire(
        action="use-oimp", host_party="LAO", authorisation_id=authorisation_id, vintage=2025,
        quantity=100, oimp_purpose="CORSIA", now=pair.now,
    )  # fmt: skip
    pair.pump()
    with pair.kor.store.transaction() as tx:
        [used] = [h.block for h in tx.holdings() if h.account == "retired-oimp"]
    from itmolink.node.convert import block_to_pb

    again = use_pb2.FirstTransferNotice(
        header=header(pair, sender_party="KOR", sender_registry="KOR-NR", audience="LAO"),
        notice_id="KOR-U-AGAIN", blocks=[block_to_pb(used)], oimp_purpose="CORSIA",
    )  # fmt: skip
    assert code(deliver_from(pair, "KOR", again)) is RejectionCode.ALREADY_FIRST_TRANSFERRED
    assert [amount for _, amount in ledger(pair.lao)] == [100]


def test_a_notice_must_describe_the_units_as_they_left_the_host(pair: Pair) -> None:
    from dataclasses import replace

    from itmolink.core.codes import RejectionCode
    from itmolink.node.convert import block_to_pb
    from itmolink.v1 import use_pb2

    from .test_limits import code, deliver_from, header

    authorisation_id = authorise(
        pair, [Purpose.OIMP], FirstTransferDefinition.AT_USE_OR_CANCELLATION
    )
    issue_and_transfer(pair, authorisation_id)
    with pair.kor.store.transaction() as tx:
        [held] = [h.block for h in tx.holdings()]
    forged = replace(held, vintage=2030)  # claims another vintage than was transferred
    notice = use_pb2.FirstTransferNotice(
        header=header(pair, sender_party="KOR", sender_registry="KOR-NR", audience="LAO"),
        notice_id="KOR-U-FORGED", blocks=[block_to_pb(forged)], oimp_purpose="CORSIA",
    )  # fmt: skip
    assert code(deliver_from(pair, "KOR", notice)) is RejectionCode.BLOCK_ATTRIBUTE_MISMATCH
    assert ledger(pair.lao) == []
