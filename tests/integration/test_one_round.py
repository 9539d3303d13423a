"""The one-round transfer between two real nodes over mutual TLS, LAO configured with
``complete_on_acceptance = true`` for KOR; and how node.toml takes the setting."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from itmolink.cli.main import main
from itmolink.core.codes import RejectionCode
from itmolink.node.config import ConfigError, load_config
from itmolink.v1 import transfer_pb2

from ..engine.test_one_round import _drop_trust
from .conftest import (
    Registry,
    eventually,
    final_state,
    link,
    running_pair,
    start_registry,
    stop_registry,
)
from .test_deliver_batch import sample
from .test_transfer import COMPLETED, REJECTED, issued, settled, transfer

PROPOSED = transfer_pb2.TRANSFER_STATE_PROPOSED

# Written after the [[partners]] entries of write_node: it lands in the last one, KOR's.
ASK = "complete_on_acceptance = true\n"
COMPLETION = "itmolink.v1.TransferCompletion"


def _journaled(registry: Registry, payload_type: str) -> int:
    with registry.node.engine.store.transaction() as tx:
        return sum(1 for entry in tx.journal_entries() if entry.payload_type == payload_type)


async def test_two_nodes_complete_a_transfer_in_one_round_trip(
    pki: Callable[..., Path],
) -> None:
    async with running_pair(pki, lao_extra=ASK) as (lao, kor):
        assert lao.node.engine.partners["KOR"].complete_on_acceptance
        assert not kor.node.engine.partners["LAO"].complete_on_acceptance
        authorisation_id = await issued(lao, quantity=1_000)
        transfer_id = await transfer(lao, authorisation_id, 600)
        assert (await final_state(lao, transfer_id)).state == COMPLETED
        assert (await final_state(kor, transfer_id)).state == COMPLETED
        await settled(lao)
        await settled(kor)
        assert [(a.transfer_id, a.amount) for a in await lao.adjustments()] == [(transfer_id, 600)]
        assert [(a.transfer_id, a.amount) for a in await kor.adjustments()] == [(transfer_id, -600)]
        assert (await lao.held(), await kor.held()) == (400, 600)
        # One round trip: the proposal and its acceptance; no completion either way.
        assert await lao.node.db(_journaled, lao, COMPLETION) == 0
        assert await kor.node.db(_journaled, kor, COMPLETION) == 0


async def test_a_one_round_transfer_waits_for_an_unreachable_partner_which_refuses_it_expired(
    pki: Callable[..., Path],
) -> None:
    """The link to KOR is down past the transfer's time-out: LAO's node does not void
    it (S4). Once the link works, KOR refuses the expired proposal (3011, recorded)
    and LAO's units come back."""
    skew = "[limits]\nmax_clock_skew_seconds = 1\n"
    lao = await start_registry(pki("LAO", ["KOR"], extra=ASK + skew))
    kor = await start_registry(pki("KOR", ["LAO"], extra=skew))
    link(lao, kor)
    try:
        authorisation_id = await issued(lao, quantity=1_000)
        lao.node.set_partner_endpoint("KOR", "127.0.0.1:1")  # nothing listens there
        transfer_id = await transfer(lao, authorisation_id, 600, timeout_seconds=1)
        await asyncio.sleep(3)  # past expires_at + skew
        engine = lao.node.engine
        assert await lao.node.db(engine.expire_transfers, dt.datetime.now(dt.UTC)) == []
        assert (await lao.transfers())[transfer_id].state == PROPOSED
        assert await lao.node.db(_journaled, lao, "itmolink.v1.TransferVoid") == 0
        assert await kor.held() == 0
        link(lao, kor)
        for registry in (kor, lao):

            async def settled_there(registry: Registry = registry) -> object:
                view = (await registry.transfers()).get(transfer_id)
                return view is not None and view.state == REJECTED and view

            view = await eventually(settled_there, within=30)
            assert view.rejection_code == RejectionCode.PROPOSAL_EXPIRED
        assert (await lao.held(), await kor.held()) == (1_000, 0)
        assert await lao.adjustments() == await kor.adjustments() == []
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


def _partner_config(pki: Callable[..., Path], extra: str) -> Path:
    return pki("LAO", ["KOR"], extra=extra)


def test_complete_on_acceptance_is_read_per_partner_and_false_by_default(
    pki: Callable[..., Path],
) -> None:
    [plain] = load_config(_partner_config(pki, "")).partners
    assert plain.complete_on_acceptance is False
    [asking] = load_config(_partner_config(pki, ASK)).partners
    assert asking.complete_on_acceptance is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('complete_on_acceptance = "yes"\n', r"'complete_on_acceptance' must be true or false"),
        ("complete_on_acceptance = 1\n", r"'complete_on_acceptance' must be true or false"),
        ("complete_on_acceptence = true\n", r"unknown field\(s\): complete_on_acceptence"),
    ],
)
def test_a_bad_complete_on_acceptance_is_refused(
    pki: Callable[..., Path], extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_partner_config(pki, extra))


@pytest.mark.parametrize(
    ("line", "grace"),
    [("", 30), ("withdrawal_grace_seconds = 0\n", 0), ("withdrawal_grace_seconds = 5\n", 5)],
)
def test_the_withdrawal_grace_is_read_and_30_s_by_default(
    pki: Callable[..., Path], line: str, grace: int
) -> None:
    """PROTOCOL §6.11 S7: how long past expires_at + 2 × max_clock_skew a one-round
    proposal still unanswered is withdrawn; a top-level field of node.toml."""
    config = pki("LAO", ["KOR"])
    config.write_text(line + config.read_text())
    assert load_config(config).withdrawal_grace_seconds == grace


@pytest.mark.parametrize("value", ["-1", "1.5", '"30"', "true"])
def test_a_bad_withdrawal_grace_is_refused(pki: Callable[..., Path], value: str) -> None:
    config = pki("LAO", ["KOR"])
    config.write_text(f"withdrawal_grace_seconds = {value}\n" + config.read_text())
    with pytest.raises(ConfigError, match=r"'withdrawal_grace_seconds' must be an integer"):
        load_config(config)


def test_check_config_shows_the_one_round_partner(
    pki: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    main(["node", "check-config", str(_partner_config(pki, ASK))])
    [line] = [line for line in capsys.readouterr().out.splitlines() if "partner KOR" in line]
    assert "one-round (complete_on_acceptance)" in line


async def test_a_partner_that_cannot_read_the_proposal_leaves_it_waiting_then_completes(
    pki: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """KOR's operator unpinned LAO's keys: KOR refuses the one-round proposal before
    looking it up (1003, unrecorded, empty in_reply_to). LAO's node keeps the units
    reserved, raises an ALARM and counts each such delivery as a `retry`, not `ok`;
    it tells the engine when each attempt left (``sent_at``). Once KOR pins the keys
    again, the next delivery completes the transfer on both sides."""
    async with running_pair(pki, lao_extra=ASK) as (lao, kor):
        authorisation_id = await issued(lao, quantity=1_000)
        engine = lao.node.engine
        sent: list[tuple[dt.datetime, dt.datetime]] = []
        apply_reply = engine.handle_reply

        def handle_reply(
            message_id: str, raw: bytes, now: dt.datetime, *, sent_at: dt.datetime | None = None
        ) -> bool:
            assert sent_at is not None  # the node says when it sent the proposal
            sent.append((sent_at, now))
            return apply_reply(message_id, raw, now, sent_at=sent_at)

        engine.handle_reply = handle_reply  # type: ignore[method-assign]
        await kor.node.db(_drop_trust, kor.node.engine, "LAO")
        transfer_id = await transfer(lao, authorisation_id, 600)

        async def retried() -> bool:
            return sample(lao, "itmolink_deliveries_total", partner="KOR", outcome="retry") >= 2

        await eventually(retried, within=30)
        assert (await lao.transfers())[transfer_id].state == PROPOSED
        assert await kor.held() == 0
        assert sum(
            r.getMessage().startswith("ALARM") and transfer_id in r.getMessage()
            for r in caplog.records
        ) == 1  # fmt: skip
        assert sent
        assert all(at <= now for at, now in sent)
        await kor.node.db(kor.node.engine.reload_trust)  # pinned again
        assert (await final_state(lao, transfer_id)).state == COMPLETED
        assert (await final_state(kor, transfer_id)).state == COMPLETED
        assert (await lao.held(), await kor.held()) == (400, 600)
        assert sample(lao, "itmolink_deliveries_total", partner="KOR", outcome="ok") >= 1
