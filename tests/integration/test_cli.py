"""The operator's command line against real running nodes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from itmolink.cli.main import EXIT_REFUSED, main
from itmolink.crypto.pki import PartnerCard

from .conftest import Registry, eventually, final_state


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``itmolink ARGS`` in a thread (it is synchronous) while the nodes serve."""
    code = await asyncio.to_thread(main, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_operator_authorises_issues_transfers_and_reads_both_ledgers(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str]
) -> None:
    lao, kor = lao_kor
    lao_cfg, kor_cfg = str(lao.config_path), str(kor.config_path)
    code, out, _ = await cli(
        capsys,
        "authorise", "--config", lao_cfg, "--activity-id", "LAO-SOLAR-WIND-1GW",
        "--cooperative-approach", "LAO-KOR-A6.2", "--acquiring-party", "KOR",
        "--purpose", "NDC", "--vintage-from", "2021", "--vintage-to", "2030",
        "--wait", "--quiet",
    )  # fmt: skip
    assert code == 0, out
    authorisation = out.strip()
    assert authorisation == "LAO-A-0001"

    code, out, _ = await cli(
        capsys, "issue", "--config", lao_cfg, "--authorisation", authorisation,
        "--vintage", "2025", "--quantity", "100000",
    )  # fmt: skip
    assert code == 0
    assert "serials LAO-NR:1-100000" in out

    code, out, _ = await cli(
        capsys, "transfer", "--config", lao_cfg, "--to", "KOR", "--authorisation",
        authorisation, "--vintage", "2025", "--quantity", "60000", "--wait",
    )  # fmt: skip
    assert code == 0
    assert "LAO-T-000001: COMPLETED" in out

    async def kor_adjusted() -> list[dict[str, object]]:
        code, out, _ = await cli(capsys, "show", "adjustments", "--json", "--config", kor_cfg)
        assert code == 0
        return list(json.loads(out).get("adjustments", []))

    kor_entries = await eventually(kor_adjusted)
    assert [(e["year"], e["amount"]) for e in kor_entries] == [(2025, "-60000")]

    code, out, _ = await cli(capsys, "show", "adjustments", "--config", lao_cfg)
    assert "net corresponding adjustment 2025: +60,000 tCO2e" in out
    code, out, _ = await cli(capsys, "show", "holdings", "--config", kor_cfg)
    assert "total held: 60,000 tCO2e in 1 block(s)" in out
    # Each block is shown by its unique identifier, which reads back to the block.
    from itmolink.core.identifier import parse_identifier

    [row] = [line for line in out.splitlines() if line.startswith("ITMO:")]
    identifier = parse_identifier(row.split()[0])
    assert (identifier.cooperative_approach_id, identifier.originating_registry) == (
        "LAO-KOR-A6.2", "LAO-NR"
    )  # fmt: skip
    assert (identifier.first_transferring_party, identifier.vintage) == ("LAO", 2025)
    assert (identifier.serial_start, identifier.serial_end) == (1, 60_000)


async def test_a_refused_request_exits_3_and_names_its_code(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str]
) -> None:
    lao, _ = lao_kor
    code, _, err = await cli(
        capsys, "issue", "--config", str(lao.config_path), "--authorisation", "LAO-A-9999",
        "--vintage", "2025", "--quantity", "1",
    )  # fmt: skip
    assert code == EXIT_REFUSED
    assert "REJECTION_CODE_UNKNOWN_AUTHORISATION" in err

    code, _, err = await cli(
        capsys, "authorise", "--config", str(lao.config_path), "--activity-id", "A",
        "--cooperative-approach", "C", "--acquiring-party", "KOR", "--purpose", "NDC",
        "--vintage-from", "2019", "--vintage-to", "2030",
    )  # fmt: skip
    assert code == EXIT_REFUSED
    assert "REJECTION_CODE_VINTAGE_BEFORE_2021" in err


async def test_an_unreachable_node_gets_a_message_that_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "me.token"
    token.write_text("not-a-real-token\n")
    token.chmod(0o600)
    code, _, err = await cli(
        capsys, "info", "--admin", "unix:/nonexistent/admin.sock", "--token-file", str(token)
    )
    assert code == 1
    assert "is 'itmolink node run' running" in err


async def test_the_admin_interface_wants_an_operator_token_and_records_who_acted(
    lao_kor: tuple[Registry, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lao, _ = lao_kor
    forged = tmp_path / "forged.token"
    forged.write_text("guessed\n")
    forged.chmod(0o600)
    code, _, err = await cli(
        capsys, "info", "--config", str(lao.config_path), "--token-file", str(forged)
    )
    assert code == 1
    assert "not allowed: no valid operator token" in err
    assert "guessed" not in err

    code, out, err = await cli(
        capsys, "operator", "add", "--config", str(lao.config_path), "--name", "alice"
    )
    assert code == 0, err
    alice = lao.keys.directory / "operators" / "alice.token"
    assert alice.stat().st_mode & 0o777 == 0o600
    assert alice.read_text().strip() not in out
    code, _, _ = await cli(
        capsys, "issue", "--config", str(lao.config_path), "--token-file", str(alice),
        "--authorisation", "LAO-A-0404", "--vintage", "2025", "--quantity", "5",
    )  # fmt: skip
    assert code == 3

    def audit() -> list[tuple[str, str, str, str, int]]:
        with lao.node.engine.store.transaction() as tx:
            return tx.admin_audit()

    rows = await lao.node.db(audit)
    assert ("alice", "Issue", "REJECTION_CODE_UNKNOWN_AUTHORISATION") in [
        (r[0], r[1], r[3]) for r in rows
    ]
    assert all(r[0] in {"admin", "alice"} for r in rows)


async def test_audit_verify_finds_an_edited_journal_entry(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_transfer import issued, transfer

    lao, _ = lao_kor
    authorisation_id = await issued(lao)
    await transfer(lao, authorisation_id, 10)
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 0, out
    assert "hash chain intact" in out

    def tamper() -> None:  # an insider edits a journal entry behind the node's back
        with lao.node.engine.store.transaction() as tx:
            tx._exec("UPDATE journal SET envelope = ? WHERE id = 2", (b"\x00",))

    await lao.node.db(tamper)
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 4
    assert "journal entry 2: content does not match its hash: edited" in out


async def test_audit_verify_finds_an_edited_or_removed_audit_row(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_transfer import issued

    lao, _ = lao_kor

    def run_sql(statement: str) -> list[Any]:  # an insider, behind the node's back
        with lao.node.engine.store.transaction() as tx:
            cursor = tx._exec(statement)
            return list(cursor.fetchall()) if statement.startswith("SELECT") else []

    await issued(lao)  # admin requests: each writes a "started" row and an outcome row
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 0, out
    assert "audit trail of" in out
    assert "rows, hash chain intact" in out
    [(rows,)] = await lao.node.db(run_sql, "SELECT COUNT(*) FROM admin_audit")
    assert rows >= 4

    # An operator's action edited after the fact...
    await lao.node.db(run_sql, "UPDATE admin_audit SET operator = 'nobody' WHERE id = 2")
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 4
    assert "audit row 2: content does not match its hash: edited" in out
    assert "entries, hash chain intact" in out  # the journal is untouched
    await lao.node.db(run_sql, "UPDATE admin_audit SET operator = 'admin' WHERE id = 2")
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 0, out

    # ... or the last rows removed.
    await lao.node.db(
        run_sql, "DELETE FROM admin_audit WHERE id = (SELECT MAX(id) FROM admin_audit)"
    )
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 4
    assert "the chain does not end at its recorded head: entries removed" in out


async def test_audit_verify_reads_the_journal_and_its_head_from_one_snapshot(
    lao_kor: tuple[Registry, Registry],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node keeps appending while an auditor verifies: an entry appended between
    reading the entries and reading the recorded head is not an entry removed."""
    from itmolink.store.tx import Tx

    from .test_transfer import issued

    lao, _ = lao_kor
    await issued(lao)
    read_entries = Tx.journal_entries

    def entries_then_append(self: Tx) -> Any:
        entries = list(read_entries(self))

        def append() -> None:
            with lao.node.engine.store.transaction() as tx:
                tx.journal(
                    direction="out", partner="KOR", message_id="appended-meanwhile",
                    payload_type="itmolink.v1.TransferStatusQuery", envelope=b"x", now=1,
                )  # fmt: skip

        append()  # another connection (the node's) commits one more entry
        return iter(entries)

    monkeypatch.setattr(Tx, "journal_entries", entries_then_append)
    code, out, _ = await cli(capsys, "audit", "verify", "--config", str(lao.config_path))
    assert code == 0, out
    assert "hash chain intact" in out


async def test_reconcile_between_running_nodes(
    lao_kor: tuple[Registry, Registry], capsys: pytest.CaptureFixture[str]
) -> None:
    from itmolink.store import read_only

    from .test_transfer import issued, transfer

    lao, kor = lao_kor
    authorisation_id = await issued(lao)
    transfer_id = await transfer(lao, authorisation_id, 10)
    await final_state(kor, transfer_id)
    code, out, _ = await cli(
        capsys, "reconcile", "--config", str(lao.config_path), "--partner", "KOR",
        "--snapshot-age", "-5",
    )  # fmt: skip
    assert code == 0, out
    assert "1 transfers here" in out
    assert "no discrepancy" in out

    def drop_adjustment() -> None:  # an insider deletes KOR's CA entry
        with kor.node.engine.store.transaction() as tx:
            tx._exec("DELETE FROM adjustments WHERE transfer_id = ?", (transfer_id,))
            tx._seal_transfer(transfer_id)

    await kor.node.db(drop_adjustment)
    code, out, _ = await cli(
        capsys, "reconcile", "--config", str(kor.config_path), "--partner", "LAO",
        "--snapshot-age", "-5",
    )  # fmt: skip
    assert code == 5
    assert transfer_id in out
    with read_only(kor.node.config.database) as tx:
        statuses = [tuple(row) for row in tx._exec("SELECT status FROM blocks").fetchall()]
    assert statuses == [("frozen",)]

    # Frozen, the units cannot be used; once the operators have resolved it, they can.
    kor_cfg = str(kor.config_path)
    retire = (
        "retire", "voluntary-cancellation", "--config", kor_cfg, "--host", "LAO",
        "--authorisation", authorisation_id, "--vintage", "2025", "--quantity", "10",
    )  # fmt: skip
    code, _, err = await cli(capsys, *retire)
    assert code == 3
    assert "INSUFFICIENT_HOLDINGS" in err
    code, _, err = await cli(capsys, "unfreeze", "--config", kor_cfg, "--transfer", transfer_id,
                             "--reason", " ")  # fmt: skip
    assert code == 3
    assert "MISSING_FIELD" in err
    reason = "LAO confirmed the transfer; our CA entry was restored by hand (ticket 42)"
    code, out, err = await cli(capsys, "unfreeze", "--config", kor_cfg, "--transfer", transfer_id,
                               "--reason", reason)  # fmt: skip
    assert code == 0, err
    assert f"1 block(s), 10 tCO2e, frozen for {transfer_id} are held again" in out
    with read_only(kor.node.config.database) as tx:
        statuses = [tuple(row) for row in tx._exec("SELECT status FROM blocks").fetchall()]
        audit = tx._exec(
            "SELECT request FROM admin_audit WHERE method = 'ReleaseFrozenBlocks'"
        ).fetchall()
    assert statuses == [("held",)]
    assert any(reason in str(row[0]) for row in audit)
    code, _, err = await cli(capsys, "unfreeze", "--config", kor_cfg, "--transfer", transfer_id,
                             "--reason", reason)  # fmt: skip
    assert code == 3
    assert "no block is frozen" in err
    code, _, err = await cli(capsys, *retire)
    assert code == 0, err


async def rotated(capsys: pytest.CaptureFixture[str], registry: Any) -> str:
    """``itmolink keys rotate``, then wait until the node signs with the new key."""
    code, out, err = await cli(capsys, "keys", "rotate", "--config", str(registry.config_path))
    assert code == 0, err
    new = out.split()[3]

    async def switched() -> bool:
        return bool(registry.node.engine.signing_key.key_id == new)

    await eventually(switched)
    return new


async def test_an_operator_gives_up_a_rotation_a_partner_never_answered(
    pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """KOR is down while LAO announces a key: the operator gives the key up (its private
    key and card entry go), rotates again once KOR is back, and LAO switches; KOR ends
    with the given-up key revoked, whatever order the two announcements arrive in."""
    from .conftest import link, start_registry, stop_registry

    lao = await start_registry(pki("LAO", ["KOR"]))
    kor_config = pki("KOR", ["LAO"])
    kor = None
    try:
        old = lao.node.engine.signing_key.key_id
        code, out, err = await cli(capsys, "keys", "rotate", "--config", str(lao.config_path))
        assert code == 0, err
        given_up = out.split()[3]
        keys = lao.keys.directory
        assert (keys / f"signing-{given_up}.key").exists()
        code, out, err = await cli(
            capsys, "keys", "cancel-rotation", "--config", str(lao.config_path)
        )
        assert code == 0, err
        assert given_up in out
        assert not (keys / f"signing-{given_up}.key").exists()
        card = PartnerCard.load(keys / "card.toml")  # listed as revoked, not as a key
        assert given_up not in [k.key_id for k in card.signing_keys]
        assert given_up in [r.key_id for r in card.revoked_keys]
        assert lao.node.engine.pending_key is None
        code, _, err = await cli(
            capsys, "keys", "cancel-rotation", "--config", str(lao.config_path)
        )
        assert code != 0
        assert "no key rotation is pending" in err
        code, out, _ = await cli(capsys, "keys", "list", "--config", str(lao.config_path))
        assert any(given_up in line and "revoked" in line for line in out.splitlines())

        kor = await start_registry(kor_config)
        link(lao, kor)
        new = await rotated(capsys, lao)
        assert new != old

        async def revoked_at_kor() -> bool:
            return kor is not None and kor.node.engine.trust.is_revoked(given_up)

        await eventually(revoked_at_kor)
    finally:
        await stop_registry(lao)
        if kor is not None:
            await stop_registry(kor)


async def test_an_operator_rotates_the_signing_key_and_transfers_go_on_after_a_restart(
    pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from .conftest import link, start_registry, stop_registry
    from .test_transfer import issued, transfer

    lao = await start_registry(pki("LAO", ["KOR"]))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    try:
        old = lao.node.engine.signing_key.key_id
        new = await rotated(capsys, lao)
        assert (lao.keys.directory / f"signing-{new}.key").stat().st_mode & 0o777 == 0o600
        assert new in (lao.keys.directory / "card.toml").read_text()
        code, out, _ = await cli(
            capsys, "keys", "revoke", "--config", str(lao.config_path), "--key-id", old
        )
        assert code == 0
        await stop_registry(lao)  # the node comes back signing with the new key
        lao = await start_registry(lao.config_path)
        link(lao, kor)
        assert lao.node.engine.signing_key.key_id == new
        authorisation_id = await issued(lao)
        transfer_id = await transfer(lao, authorisation_id, 10)
        assert (await final_state(kor, transfer_id)).state == 3
        code, out, _ = await cli(capsys, "keys", "list", "--config", str(kor.config_path))
        assert any(old in line and "revoked" in line for line in out.splitlines())
        assert any(new in line and "pinned" in line for line in out.splitlines())
    finally:
        await stop_registry(lao)
        await stop_registry(kor)
