"""Batched transfers between two real nodes over mutual TLS (docs/PROTOCOL.md §5.15)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.core.codes import RejectionCode
from itmolink.crypto.envelope import TrustStore, open_envelope
from itmolink.node.convert import timestamp, to_us
from itmolink.v1 import transfer_pb2

from .conftest import PartnerClient, Registry, final_state, header, signed, trailers
from .test_cli import cli
from .test_transfer import (
    COMPLETED,
    REJECTED,
    evidence_of_adjustments,
    issued,
    settled,
)


async def batch(lao: Registry, authorisation_id: str, *quantities: int) -> list[str]:
    response = await lao.call(
        "TransferBatch",
        admin_pb2.TransferBatchRequest(
            to_party="KOR",
            items=[
                admin_pb2.TransferBatchRequestItem(
                    authorisation_id=authorisation_id, vintage=2025, quantity=q
                )
                for q in quantities
            ],
        ),
    )
    assert response.batch_id.startswith("LAO-B-")
    return list(response.transfer_ids)


async def test_a_batch_with_a_rejected_item_completes_the_others(
    lao_kor: tuple[Registry, Registry],
) -> None:
    """KOR already expects serials 1-100 (a hand-made proposal signed with LAO's key),
    so the first item of LAO's batch, which takes serials 1-100, is rejected with
    SERIALS_ALREADY_HELD; the other two complete."""
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    try:
        block = (await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())).blocks[0].block
        block.serial_end = 100
        proposal = transfer_pb2.TransferProposal(
            header=header("LAO", "KOR", sequence=10_000), transfer_id="LAO-T-HANDMADE",
            authorisation_id=authorisation_id, quantity=100, blocks=[block], first_transfer=True,
            expires_at=timestamp(to_us(dt.datetime.now(dt.UTC)) + 3_600_000_000),
        )  # fmt: skip
        reply = await client.deliver(signed(proposal, lao.signing_key())[1])
        verified = open_envelope(reply, TrustStore([kor.signing_key().verifying_key()]))
        assert verified.payload_type == "itmolink.v1.TransferAcceptance"
    finally:
        await client.close()

    first, second, third = await batch(lao, authorisation_id, 100, 200, 50)
    for registry in (lao, kor):
        view = await final_state(registry, first)
        assert view.state == REJECTED
        assert view.rejection_code == RejectionCode.SERIALS_ALREADY_HELD
        assert (await final_state(registry, second)).state == COMPLETED
        assert (await final_state(registry, third)).state == COMPLETED
    await settled(lao)
    assert await lao.held() == 1_000 - 250
    assert await kor.held() == 250
    # Each adjustment cites the batch message journaled in its transaction.
    assert evidence_of_adjustments(lao) == [
        (second, 200, "in", "KOR", "itmolink.v1.TransferBatchAcceptance"),
        (third, 50, "in", "KOR", "itmolink.v1.TransferBatchAcceptance"),
    ]
    assert evidence_of_adjustments(kor) == [
        (second, -200, "in", "LAO", "itmolink.v1.TransferBatchCompletion"),
        (third, -50, "in", "LAO", "itmolink.v1.TransferBatchCompletion"),
    ]


async def test_a_batch_request_over_the_limit_or_over_holdings_reserves_nothing(
    lao_kor: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=2_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batch(lao, authorisation_id, *[1] * 1_001)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metadata = trailers(caught.value)
    assert metadata["itmolink-rejection-code"] == "REJECTION_CODE_TOO_MANY_ITEMS"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batch(lao, authorisation_id, 1_500, 600)  # the second item finds 500 left
    metadata = trailers(caught.value)
    assert metadata["itmolink-rejection-code"] == "REJECTION_CODE_INSUFFICIENT_HOLDINGS"
    assert await lao.transfers() == {}
    assert await lao.held() == 2_000
    holdings = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
    assert {h.status for h in holdings.blocks} == {"held"}
    assert await kor.transfers() == {}


async def test_the_cli_proposes_a_batch_from_a_csv_and_waits_for_each_transfer(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lao, kor = lao_kor
    authorisation_id = await issued(lao, quantity=1_000)
    rows = tmp_path / "batch.csv"
    rows.write_text(
        "authorisation,vintage,quantity\n"
        + "".join(f"{authorisation_id},2025,{q}\n" for q in (100, 200, 300))
    )
    code, out, _ = await cli(
        capsys, "transfer-batch", "--config", str(lao.config_path), "--to", "KOR",
        "--csv", str(rows), "--wait",
    )  # fmt: skip
    assert code == 0, out
    assert "batch LAO-B-000001 proposed to KOR: 3 transfers, 600 tCO2e" in out
    assert out.count(": COMPLETED") == 3
    code, out, _ = await cli(
        capsys, "transfer-batch", "--config", str(lao.config_path), "--to", "KOR",
        "--authorisation", authorisation_id, "--vintage", "2025",
        "--quantity", "150", "--quantity", "250", "--quantity", "1",
    )  # fmt: skip
    assert code == 3, out  # 400 left: the third transfer finds none
    assert await kor.held() == 600
