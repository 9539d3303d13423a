"""Revoking a signing key through the command line of real nodes: the card file
lists the revocation, a compromise instant out of range or not in whole seconds is
refused (2010), and a partner added later with an older copy of the card is told."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.crypto.pki import PartnerCard
from itmolink.node import runtime

from .conftest import eventually, link, start_registry, stop_registry, trailers
from .test_cli import cli, rotated


async def test_a_revocation_reaches_a_partner_that_pinned_an_older_card(
    pki: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lao = await start_registry(pki("LAO", ["KOR"]))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    jpn = None
    try:
        old = lao.node.engine.signing_key.key_id
        new = await rotated(capsys, lao)
        card_file = lao.keys.directory / "card.toml"
        older_copy = tmp_path / "lao-card-before-the-revocation.toml"
        shutil.copy(card_file, older_copy)  # lists both keys

        for seconds, nanos in ((2**62, 0), (1_800_000_000, 500_000_000)):  # 2010, not a crash
            request = admin_pb2.RevokeSigningKeyRequest(key_id=old)
            request.compromised_since.seconds, request.compromised_since.nanos = seconds, nanos
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await lao.call("RevokeSigningKey", request)
            trailing = trailers(refused.value)
            assert "REJECTION_CODE_INVALID_FIELD" in trailing.values()
            assert ("out of range" if nanos == 0 else "whole seconds") in str(
                refused.value.details()
            )
        with pytest.raises(SystemExit):  # argparse refuses a time without an offset
            await cli(
                capsys, "keys", "revoke", "--config", str(lao.config_path), "--key-id", old,
                "--compromised-since", "2020-01-01T00:00:00",
            )  # fmt: skip
        assert "has no offset" in capsys.readouterr().err
        code, out, err = await cli(
            capsys, "keys", "revoke", "--config", str(lao.config_path), "--key-id", old
        )
        assert code == 0, err
        card = PartnerCard.load(card_file)
        assert [k.key_id for k in card.signing_keys] == [new]
        assert [r.key_id for r in card.revoked_keys] == [old]

        async def revoked_at(registry: Any) -> bool:
            return bool(registry.node.engine.trust.is_revoked(old))

        await eventually(lambda: revoked_at(kor))

        # A node that pins the current card refuses the key from the card alone.
        jpn_config = pki("JPN", ["LAO"])
        jpn = await start_registry(jpn_config)
        assert jpn.node.engine.trust.get(old) is None
        assert jpn.node.engine.trust.is_revoked(old)
        await stop_registry(jpn)
        jpn = None
        # JPN joins with the older copy of LAO's card; LAO restarts with JPN added.
        jpn_config.write_text(
            jpn_config.read_text().replace("../lao/pki/card.toml", str(older_copy))
        )
        await stop_registry(lao)
        lao = await start_registry(pki("LAO", ["KOR", "JPN"]))
        jpn = await start_registry(jpn_config)
        assert jpn.node.engine.trust.get(old) is not None
        link(lao, kor)
        link(lao, jpn)
        await eventually(lambda: revoked_at(jpn))
        code, out, _ = await cli(capsys, "keys", "list", "--config", str(jpn.config_path))
        assert any(old in line and "revoked" in line for line in out.splitlines())
        assert any(new in line and "pinned" in line for line in out.splitlines())
    finally:
        for registry in (lao, kor, jpn):
            if registry is not None:
                await stop_registry(registry)


async def test_a_card_written_before_it_listed_revocations_gets_them_at_start(
    pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An upgraded node: its ledger revoked a key its card file still lists (the old
    `keys revoke` only dropped the key, or never touched the card). At the next
    start the card file lists it under [[revoked_keys]], with its instant."""
    lao = await start_registry(pki("LAO", ["KOR"]))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    try:
        old = lao.node.engine.signing_key.key_id
        await rotated(capsys, lao)
        card_file = lao.keys.directory / "card.toml"
        before = card_file.read_text()
        since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        engine = lao.node.engine
        await lao.node.db(engine.revoke_signing_key, old, lao.node.clock(), "", since)
        assert card_file.read_text() == before  # as an older release left it
        assert old in [k.key_id for k in PartnerCard.load(card_file).signing_keys]
        await stop_registry(lao)
        lao = await start_registry(lao.config_path)
        card = PartnerCard.load(card_file)
        assert old not in [k.key_id for k in card.signing_keys]
        assert [(r.key_id, r.compromised_since) for r in card.revoked_keys] == [(old, since)]
    finally:
        for registry in (lao, kor):
            await stop_registry(registry)


async def test_a_card_file_the_node_cannot_write_costs_an_alarm_not_the_start(
    pki: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same upgraded node with a card file it may not replace: it starts and serves,
    raises an ALARM, and leaves the card file whole as it was."""
    lao = await start_registry(pki("LAO", ["KOR"]))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    try:
        old = lao.node.engine.signing_key.key_id
        await rotated(capsys, lao)
        card_file = lao.keys.directory / "card.toml"
        engine = lao.node.engine
        await lao.node.db(engine.revoke_signing_key, old, lao.node.clock(), "", None)
        before = card_file.read_text()
        await stop_registry(lao)

        def refused(src: Any, dst: Any) -> None:
            raise PermissionError(13, "Permission denied", str(dst))

        monkeypatch.setattr("itmolink.node.runtime.os.replace", refused)
        with caplog.at_level("ERROR", logger=runtime.log.name):
            lao = await start_registry(lao.config_path)
        assert any(r.getMessage().startswith("ALARM: could not write") for r in caplog.records), [
            r.getMessage() for r in caplog.records
        ]
        assert card_file.read_text() == before
        assert lao.node.engine.signing_key.key_id != old  # it started, on its new key
    finally:
        for registry in (lao, kor):
            await stop_registry(registry)
