"""Security properties that need real nodes: rate limits, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from itmolink.cli.main import main
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.operators import read_token, token_file

from .conftest import PartnerClient, link, start_registry, stop_registry
from .test_transfer import final_state, issued, transfer


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
                metadata = dict(error.trailing_metadata() or ())
                codes.append(f"{error.code().name} {metadata.get('itmolink-rejection-code')}")
        assert codes[:2] == ["answered", "answered"]
        assert "RESOURCE_EXHAUSTED REJECTION_CODE_RATE_LIMITED" in codes[2:]
    finally:
        await client.close()
        await stop_registry(lao)
        await stop_registry(kor)


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
    lao_kor: tuple, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
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
