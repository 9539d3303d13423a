"""Rejection codes: the one catalogue, mirrored from proto/itmolink/v1/codes.proto.

The numbers are the wire values of ``itmolink.v1.RejectionCode``; a unit test
checks that every member here matches the proto enum by name and number, so
the two cannot drift. docs/codes.md describes each code.
"""

from __future__ import annotations

import enum


class RejectionCode(enum.IntEnum):
    """Why a message or an operator request was refused."""

    UNSPECIFIED = 0

    # 1xxx: version and authentication.
    UNSUPPORTED_VERSION = 1001
    MALFORMED_ENVELOPE = 1002
    UNKNOWN_SIGNING_KEY = 1003
    BAD_SIGNATURE = 1004
    SIGNER_NOT_PEER = 1005
    SENDER_MISMATCH = 1006
    WRONG_AUDIENCE = 1007
    SIGNING_KEY_NOT_YET_VALID = 1008
    SIGNING_KEY_EXPIRED = 1009
    SIGNING_KEY_REVOKED = 1010

    # 2xxx: message viability.
    UNKNOWN_PAYLOAD_TYPE = 2001
    MALFORMED_PAYLOAD = 2002
    MISSING_FIELD = 2003
    UNEXPECTED_REPLY = 2004
    UNKNOWN_PARTNER = 2005
    INVALID_IDENTIFIER = 2006
    MESSAGE_TOO_LARGE = 2007
    TOO_MANY_BLOCKS = 2008
    RATE_LIMITED = 2009
    INVALID_FIELD = 2010
    TOO_MANY_ITEMS = 2011

    # 3xxx: data integrity.
    INVALID_BLOCK = 3001
    QUANTITY_MISMATCH = 3002
    OVERLAPPING_BLOCKS = 3003
    BLOCK_ATTRIBUTE_MISMATCH = 3004
    SERIALS_ALREADY_HELD = 3005
    UNKNOWN_AUTHORISATION = 3006
    UNKNOWN_TRANSFER = 3007
    TRANSFER_STATE_CONFLICT = 3008
    AUTHORISATION_CONFLICT = 3009
    DIGEST_MISMATCH = 3010
    PROPOSAL_EXPIRED = 3011

    # 4xxx: Article 6 rules.
    NOT_ACQUIRING_PARTY = 4001
    VINTAGE_BEFORE_2021 = 4002
    VINTAGE_NOT_AUTHORISED = 4003
    AUTHORISATION_CAP_EXCEEDED = 4004
    INSUFFICIENT_HOLDINGS = 4005
    AUTHORISATION_NOT_ACKNOWLEDGED = 4006
    NOT_HOST_PARTY = 4007
    PURPOSE_NOT_AUTHORISED = 4008
    UNIT_TYPE_NOT_ALLOWED_FOR_USE = 4009
    VINTAGE_OUTSIDE_NDC_PERIOD = 4010
    CARRY_OVER_NOT_ALLOWED = 4011
    HOST_THRESHOLD_EXCEEDED = 4012
    ALREADY_FIRST_TRANSFERRED = 4013
    AUTHORISATION_REVOKED = 4014
    AMENDMENT_NOT_ALLOWED = 4015
    MISSING_OIMP_DETAIL = 4016
    OIMP_TERMS_WITHOUT_OIMP = 4017
    QUANTITY_TOO_SMALL_FOR_LEVIES = 4018

    # 5xxx: sequence and idempotency.
    DUPLICATE_MESSAGE_CONFLICT = 5001
    SEQUENCE_REUSED = 5002
    SENT_AT_OUT_OF_WINDOW = 5003

    @property
    def wire_name(self) -> str:
        """The proto enum value name, e.g. ``REJECTION_CODE_BAD_SIGNATURE``."""
        return f"REJECTION_CODE_{self.name}"


def wire_name_of(code: int) -> str:
    """The wire name of a code number, also of one this version does not know
    (``REJECTION_CODE_<number>``): a partner's newer code is shown, not refused."""
    try:
        return RejectionCode(code).wire_name
    except ValueError:
        return f"REJECTION_CODE_{code}"


class Rejected(Exception):
    """A check failed. Carries the code and a detail naming the offending input."""

    def __init__(self, code: RejectionCode, detail: str) -> None:
        super().__init__(f"{code.wire_name}: {detail}")
        self.code = code
        self.detail = detail
