"""Security properties that need real nodes: rate limits, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from itmolink.cli.main import main
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.operators import read_token, token_file
from itmolink.node.ratelimit import TokenBucket

from .conftest import (
    PartnerClient,
    Registry,
    final_state,
    link,
    running_pair,
    start_registry,
    stop_registry,
    trailers,
)
from .test_transfer import issued, journal_rows, transfer


async def test_a_partner_over_its_rate_is_told_to_retry_later(pki: Callable[..., Path]) -> None:
    kor = await start_registry(
        pki("KOR", ["LAO"], extra="[limits]\nrate_per_second = 1\nrate_burst = 2\n")
    )
    lao = await start_registry(pki("LAO", ["KOR"]))
    link(lao, kor)
    client = PartnerClient(kor, lao.keys, kor.keys.ca_certificate.read_bytes())
    try:
        codes = []
        for _ in range(4):
            try:
                await client.deliver(b"not even an envelope")
                codes.append("answered")
            except grpc.aio.AioRpcError as error:
                metadata = trailers(error)
                codes.append(f"{error.code().name} {metadata.get('itmolink-rejection-code')}")
        assert codes[:2] == ["answered", "answered"]
        assert "RESOURCE_EXHAUSTED REJECTION_CODE_RATE_LIMITED" in codes[2:]
    finally:
        await client.close()
        await stop_registry(lao)
        await stop_registry(kor)


async def test_proposals_over_the_transfer_budget_are_retried_until_it_refills(
    pki: Callable[..., Path],
) -> None:
    """Three proposals sent together to a partner that takes one transfer a second:
    the ones over its budget are refused unrecorded (RESOURCE_EXHAUSTED, 2009) and
    the sender's retries get them through, each recorded once."""
    async with running_pair(pki) as (lao, kor):
        authorisation_id = await issued(lao)
        kor.node.engine.limits = dataclasses.replace(
            kor.node.engine.limits, transfer_items_per_second=1, transfer_items_burst=1_000
        )
        budget = TokenBucket(1, 1_000, time.time())
        budget.tokens = 1.0  # one transfer now, then one a second
        kor.node.engine._transfer_items["LAO"] = budget
        ids = await asyncio.gather(*(transfer(lao, authorisation_id, 10) for _ in range(3)))
        for transfer_id in ids:
            assert (await final_state(kor, transfer_id)).state == 3  # completed
            assert (await final_state(lao, transfer_id)).state == 3
        limited = kor.node.metrics.registry.get_sample_value(
            "itmolink_messages_received_total", {"partner": "LAO", "outcome": "rate_limited"}
        )
        assert limited is not None
        assert limited >= 1
        # One more, alone (by Deliver), while the budget is spent.
        budget.tokens = 0.0
        last = await transfer(lao, authorisation_id, 10)
        assert (await final_state(kor, last)).state == 3
        again = kor.node.metrics.registry.get_sample_value(
            "itmolink_messages_received_total", {"partner": "LAO", "outcome": "rate_limited"}
        )
        assert again is not None
        assert again > limited
        proposals = [r for r in journal_rows(kor) if r[4] == "itmolink.v1.TransferProposal"]
        assert len(proposals) == len({r[3] for r in proposals}) == 4


def _secrets(keys_dir: Path) -> list[str]:
    """Every private key's base64 body lines and every operator token."""
    found = []
    for name in ("ca.key", "node.key", "signing.key"):
        body = [
            line
            for line in (keys_dir / name).read_text().splitlines()
            if line and not line.startswith("-----")
        ]
        found += body
    found.append(read_token(token_file(keys_dir, "admin")))
    return [s for s in found if len(s) >= 16]


async def test_private_keys_and_admin_tokens_never_reach_logs_or_errors(
    lao_kor: tuple[Registry, Registry], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    lao, kor = lao_kor
    caplog.set_level(logging.DEBUG)
    authorisation_id = await issued(lao)
    transfer_id = await transfer(lao, authorisation_id, 10)
    await final_state(kor, transfer_id)
    # Error paths too: refused requests, a wrong token, a bad configuration.
    wrong = tmp_path / "wrong.token"
    wrong.write_text(read_token(token_file(lao.keys.directory, "admin"))[::-1] + "\n")
    wrong.chmod(0o600)
    for args in (
        ["info", "--config", str(lao.config_path), "--token-file", str(wrong)],
        ["issue", "--config", str(lao.config_path), "--authorisation", "X", "--vintage",
         "2025", "--quantity", "1"],
        ["transfer", "--config", str(lao.config_path), "--to", "KOR", "--authorisation",
         authorisation_id, "--vintage", "2025", "--quantity", "999999999"],
        ["node", "run", "--config", str(tmp_path / "missing.toml")],
    ):  # fmt: skip
        await asyncio.to_thread(main, args)
    loose = lao.keys.directory / "loose.key"
    loose.write_text((lao.keys.directory / "signing.key").read_text())
    loose.chmod(0o644)
    with pytest.raises(PermissionError) as caught:
        SigningKey.load("LAO", loose)
    captured = capsys.readouterr()
    everything = caplog.text + captured.out + captured.err + str(caught.value)
    everything += repr(lao.signing_key()) + str(lao.node.engine.signing_key)
    for party in (lao, kor):
        for secret in _secrets(party.keys.directory):
            assert secret not in everything
    assert re.search(r"REJECTION_CODE_INSUFFICIENT_HOLDINGS", everything)  # errors were seen


def test_a_transfer_budget_too_small_for_a_batch_is_refused(pki: Callable[..., Path]) -> None:
    from itmolink.node.config import ConfigError, load_config

    small = pki("LAO", ["KOR"], extra="[limits]\ntransfer_items_burst = 999\n")
    with pytest.raises(ConfigError, match=r"limits\.transfer_items_burst.*at least 1000"):
        load_config(small)
    enough = load_config(pki("KOR", ["LAO"], extra="[limits]\ntransfer_items_burst = 1000\n"))
    assert enough.limits.transfer_items_burst == 1000
    assert enough.limits.transfer_items_per_second == 1000  # the default
