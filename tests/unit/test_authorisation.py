"""Authorisations: OIMP terms, unit types, amendments and revocation."""

from __future__ import annotations

import pytest

from itmolink.core.authorisation import (
    Authorisation,
    UnitStatus,
    check_amendment,
    check_authorisation,
    revoke,
    with_acquiring_party_reference,
)
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from tests.unit.article6 import NDC_AUTH, OIMP_AUTH, authorisation, block, code_of

C = RejectionCode
NDC, OIMP = Purpose.NDC, Purpose.OIMP
FTD = FirstTransferDefinition

# check_authorisation


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (NDC_AUTH, None),
        (OIMP_AUTH, None),
        (authorisation(OIMP_AUTH, terms={"purposes": frozenset({OIMP})}), None),
        *[
            (authorisation(OIMP_AUTH, first_transfer_definition=definition), None)
            for definition in (FTD.AT_AUTHORISATION, FTD.AT_USE_OR_CANCELLATION)
        ],
        (authorisation(terms={"unit_type": UnitType.A6_4ER_AUTHORISED}), None),
        (
            authorisation(
                terms={
                    "unit_type": UnitType.TRANSITIONED_CER,
                    "vintage_from": 2015,
                    "vintage_to": 2020,
                }
            ),
            None,
        ),
        (authorisation(acquiring_party_references=(("KOR", "KOR-LOA-7"),)), None),
        # Terms checks still apply.
        (authorisation(terms={"vintage_from": 2020}), C.VINTAGE_BEFORE_2021),
        (authorisation(terms={"cooperative_approach_id": ""}), C.MISSING_FIELD),
        (authorisation(terms={"quantity_cap": -1}), C.QUANTITY_MISMATCH),
        # OIMP needs its purpose and its first-transfer definition...
        (authorisation(OIMP_AUTH, oimp_detail=""), C.MISSING_OIMP_DETAIL),
        (authorisation(OIMP_AUTH, oimp_detail="  "), C.MISSING_OIMP_DETAIL),
        (
            authorisation(OIMP_AUTH, first_transfer_definition=FTD.UNSPECIFIED),
            C.MISSING_OIMP_DETAIL,
        ),
        # ...and without OIMP they are meaningless.
        (authorisation(oimp_detail="CORSIA"), C.OIMP_TERMS_WITHOUT_OIMP),
        (authorisation(first_transfer_definition=FTD.AT_ISSUANCE), C.OIMP_TERMS_WITHOUT_OIMP),
        # Unit types that cannot be authorised for the purpose.
        (
            authorisation(terms={"unit_type": UnitType.A6_4ER_MITIGATION_CONTRIBUTION}),
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        (
            authorisation(
                OIMP_AUTH,
                terms={
                    "unit_type": UnitType.TRANSITIONED_CER,
                    "vintage_from": 2015,
                    "vintage_to": 2020,
                },
            ),
            C.UNIT_TYPE_NOT_ALLOWED_FOR_USE,
        ),
        (authorisation(acquiring_party_references=(("CHE", "x"),)), C.NOT_ACQUIRING_PARTY),
    ],
)
def test_check_authorisation(auth: Authorisation, expected: C | None) -> None:
    assert code_of(lambda: check_authorisation(auth)) is expected


def test_acquiring_party_reference_is_recorded_without_a_new_version() -> None:
    auth = with_acquiring_party_reference(NDC_AUTH, "KOR", "KOR-LOA-7")
    auth = with_acquiring_party_reference(auth, "JPN", "JCM-42")
    auth = with_acquiring_party_reference(auth, "KOR", "KOR-LOA-8")
    assert auth.reference_of("KOR") == "KOR-LOA-8"
    assert auth.reference_of("JPN") == "JCM-42"
    assert auth.reference_of("CHE") is None
    assert auth.version == 1
    assert (
        code_of(lambda: with_acquiring_party_reference(auth, "CHE", "r")) is C.NOT_ACQUIRING_PARTY
    )
    assert code_of(lambda: with_acquiring_party_reference(auth, "KOR", "")) is C.MISSING_FIELD


# check_amendment

AMENDED = authorisation(terms={"version": 2})
ISSUED = {2025: 600, 2026: 400}


def amendment_code(
    proposed: Authorisation,
    *,
    current: Authorisation = NDC_AUTH,
    issued: dict[int, int] | None = None,
    received_by: tuple[str, ...] = ("KOR",),
) -> C | None:
    return code_of(
        lambda: check_amendment(
            current,
            proposed,
            issued_by_vintage=ISSUED if issued is None else issued,
            received_by=received_by,
        )
    )


@pytest.mark.parametrize(
    ("terms", "changes", "expected"),
    [
        ({}, {}, None),
        ({"quantity_cap": 200_000}, {}, None),
        ({"quantity_cap": 1000}, {}, None),
        ({"quantity_cap": 0}, {}, None),
        ({"quantity_cap": 999}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"vintage_from": 2025, "vintage_to": 2026}, {}, None),
        ({"vintage_to": 2035}, {}, None),
        ({"vintage_from": 2026}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"vintage_to": 2025}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"acquiring_parties": frozenset({"KOR", "JPN", "CHE"})}, {}, None),
        ({"acquiring_parties": frozenset({"KOR"})}, {}, None),
        ({"acquiring_parties": frozenset({"JPN"})}, {}, C.AMENDMENT_NOT_ALLOWED),
        (
            {"purposes": frozenset({NDC, OIMP})},
            {"oimp_detail": "CORSIA", "first_transfer_definition": FTD.AT_ISSUANCE},
            None,
        ),
        (
            {"purposes": frozenset({OIMP})},
            {"oimp_detail": "CORSIA", "first_transfer_definition": FTD.AT_ISSUANCE},
            C.AMENDMENT_NOT_ALLOWED,
        ),
        # Fixed terms.
        ({"authorisation_id": "LAO-A-0002"}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"host_party": "THA"}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"activity_id": "LAO-WIND"}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"cooperative_approach_id": "CA0002"}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"unit_type": UnitType.A6_4ER_AUTHORISED}, {}, C.AMENDMENT_NOT_ALLOWED),
        # Versions follow one another.
        ({"version": 1}, {}, C.AMENDMENT_NOT_ALLOWED),
        ({"version": 3}, {}, C.AMENDMENT_NOT_ALLOWED),
        # An amendment is itself a valid authorisation.
        ({"purposes": frozenset({NDC, OIMP})}, {}, C.MISSING_OIMP_DETAIL),
        ({}, {"revoked": True}, C.AMENDMENT_NOT_ALLOWED),
    ],
)
def test_check_amendment(
    terms: dict[str, object], changes: dict[str, object], expected: C | None
) -> None:
    assert amendment_code(authorisation(AMENDED, terms=terms, **changes)) is expected


def test_before_issuance_purposes_and_oimp_terms_may_change() -> None:
    current = OIMP_AUTH
    ndc_only = authorisation(
        current,
        terms={"version": 2, "purposes": frozenset({NDC})},
        oimp_detail="",
        first_transfer_definition=FTD.UNSPECIFIED,
    )
    other_definition = authorisation(
        current, terms={"version": 2}, first_transfer_definition=FTD.AT_AUTHORISATION
    )
    other_detail = authorisation(current, terms={"version": 2}, oimp_detail="IMP")
    for proposed in (ndc_only, other_definition, other_detail):
        assert amendment_code(proposed, current=current, issued={}) is None
        assert amendment_code(proposed, current=current) is C.AMENDMENT_NOT_ALLOWED
    # Zero issued in a vintage counts as nothing issued there.
    narrower = authorisation(AMENDED, terms={"vintage_from": 2027})
    assert amendment_code(narrower, issued={2025: 0, 2027: 5}) is None


def test_a_revoked_authorisation_cannot_be_amended() -> None:
    revoked = authorisation(revoked=True)
    assert amendment_code(AMENDED, current=revoked) is C.AUTHORISATION_REVOKED


# revoke

UNITS = [
    UnitStatus(block(1, 100), first_transferred=True),
    UnitStatus(block(101, 250), first_transferred=False),
    UnitStatus(block(251, 260, vintage=2026), first_transferred=False),
    UnitStatus(block(501, 600), first_transferred=True),
]


def test_revocation_refuses_first_transferred_units_and_records_the_rest() -> None:
    result = revoke(NDC_AUTH, UNITS)
    assert result.revoked == (block(101, 250), block(251, 260, vintage=2026))
    assert result.refused == (
        (block(1, 100), C.ALREADY_FIRST_TRANSFERRED),
        (block(501, 600), C.ALREADY_FIRST_TRANSFERRED),
    )
    assert result.revoked_quantity == 160
    # 360 issued under a cap of 100,000: the rest will never be issued.
    assert result.unissued_revoked == 100_000 - 360
    assert result.authorisation.revoked
    assert result.authorisation.version == 2
    assert result.authorisation.terms.quantity_cap == NDC_AUTH.terms.quantity_cap


@pytest.mark.parametrize(
    ("first_transferred", "revoked", "refused"),
    [((), 2, 0), ((True, True), 0, 2), ((True, False), 1, 1)],
)
def test_revocation_partition(
    first_transferred: tuple[bool, ...], revoked: int, refused: int
) -> None:
    flags = first_transferred or (False, False)
    units = [UnitStatus(block(1, 10), flags[0]), UnitStatus(block(11, 20), flags[1])]
    result = revoke(NDC_AUTH, units)
    assert (len(result.revoked), len(result.refused)) == (revoked, refused)


def test_revocation_without_units_or_cap() -> None:
    result = revoke(authorisation(terms={"quantity_cap": 0}), [])
    assert result.revoked == ()
    assert result.refused == ()
    assert result.unissued_revoked == 0


def test_at_authorisation_oimp_units_are_all_first_transferred_so_all_refused() -> None:
    # With the first transfer at authorisation, every issued unit is first-transferred.
    auth = authorisation(OIMP_AUTH, first_transfer_definition=FTD.AT_AUTHORISATION)
    result = revoke(auth, [UnitStatus(block(1, 10), first_transferred=True)])
    assert result.revoked == ()
    assert [code for _, code in result.refused] == [C.ALREADY_FIRST_TRANSFERRED]


def test_revocation_refuses_foreign_blocks_and_double_revocation() -> None:
    foreign = [UnitStatus(block(1, 10, authorisation_id="LAO-A-0002"), False)]
    assert code_of(lambda: revoke(NDC_AUTH, foreign)) is C.BLOCK_ATTRIBUTE_MISMATCH
    revoked = revoke(NDC_AUTH, UNITS).authorisation
    assert code_of(lambda: revoke(revoked, UNITS)) is C.AUTHORISATION_REVOKED


def test_rejected_is_raised_not_returned() -> None:
    with pytest.raises(Rejected):
        check_authorisation(authorisation(oimp_detail="CORSIA"))
