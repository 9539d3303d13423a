"""``itmolink node check-config``: a good configuration passes, each kind of bad one fails
with the check that names it, and nothing is started or written."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from itmolink.cli.main import main
from itmolink.crypto.keys import SigningKey, write_private_file
from itmolink.crypto.pki import NODE_VALIDITY
from itmolink.node import checkconfig
from itmolink.node.checkconfig import check_config
from itmolink.node.config import load_config
from itmolink.store import Store, open_store
from itmolink.store.migrate import latest_version


def run(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    code = main(["node", "check-config", str(config)])
    out = capsys.readouterr().out
    verdicts = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("OK", "FAIL"):
            name = rest.strip().split("  ")[0]
            verdicts[name] = status.strip()
    return code, verdicts


def failed(verdicts: dict[str, str]) -> list[str]:
    return [name for name, status in verdicts.items() if status == "FAIL"]


@pytest.fixture
def config(pki: Callable[..., Path]) -> Path:
    return pki("LAO", ["KOR"], extra='[metrics]\nlisten = "127.0.0.1:9464"\n')


def _open(config: Path, party: str = "LAO") -> Store:
    return open_store(load_config(config).database, party=party, registry=f"{party}-NR")


def test_a_good_configuration_passes_every_check_and_creates_nothing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, verdicts = run(config, capsys)
    assert code == 0
    assert failed(verdicts) == []
    for name in ("configuration", "TLS private key file", "signing key file", "node certificate",
                 "own partner card", "signing key", "partner KOR", "partner_listen",
                 "admin_listen", "metrics.listen", "operators", "database"):  # fmt: skip
        assert verdicts.get(name) == "OK", name
    database = load_config(config).database
    if isinstance(database, Path):
        assert not database.exists()  # read-only: no database created


def test_an_existing_database_reports_its_schema_version(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _open(config).close()
    code = main(["node", "check-config", str(config)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"schema version {latest_version()} (this itmolink: {latest_version()})" in out


def test_a_private_key_readable_by_others_fails(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent / "pki" / "node.key").chmod(0o644)
    code, verdicts = run(config, capsys)
    assert code == 1
    assert "TLS private key file" in failed(verdicts)


def test_a_certificate_that_does_not_match_its_key_fails(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kor_key = config.parent.parent / "kor" / "pki" / "node.key"
    (config.parent / "pki" / "node.key").unlink()
    write_private_file(config.parent / "pki" / "node.key", kor_key.read_bytes())
    code, verdicts = run(config, capsys)
    assert code == 1
    assert failed(verdicts) == ["node certificate"]


def test_a_signing_key_missing_from_the_card_fails(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = SigningKey.generate("LAO")
    (config.parent / "pki" / "signing.key").unlink()
    write_private_file(config.parent / "pki" / "signing.key", other.private_pem())
    code, verdicts = run(config, capsys)
    assert code == 1
    assert failed(verdicts) == ["signing key"]


def test_a_missing_operators_file_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config.parent / "pki" / "operators.toml").unlink()
    code, verdicts = run(config, capsys)
    assert code == 1
    assert failed(verdicts) == ["operators"]


def test_an_unparsable_partner_card_fails_the_configuration(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent.parent / "kor" / "pki" / "card.toml").write_text("party = \n")
    code, verdicts = run(config, capsys)
    assert code == 1
    assert verdicts == {"configuration": "FAIL"}


def test_bad_listen_addresses_fail(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = config.read_text().replace('"127.0.0.1:0"', '"127.0.0.1:99999"')
    text = text.replace('"unix:admin.sock"', '"unix:no-such-dir/admin.sock"')
    config.write_text(text)
    code, verdicts = run(config, capsys)
    assert code == 1
    assert sorted(failed(verdicts)) == ["admin_listen", "partner_listen"]


def test_another_partys_database_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _open(config, party="KOR").close()
    code, verdicts = run(config, capsys)
    assert code == 1
    assert failed(verdicts) == ["database"]


def test_a_database_newer_than_the_code_fails(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _open(config)
    with store.transaction() as tx:
        tx._exec(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
            (latest_version() + 1,),
        )
    store.close()
    code = main(["node", "check-config", str(config)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"schema version {latest_version() + 1}, newer than this itmolink" in out
    with pytest.raises(RuntimeError, match="newer than this itmolink"):
        _open(config)


def test_a_missing_configuration_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, verdicts = run(tmp_path / "nope.toml", capsys)
    assert code == 1
    assert verdicts == {"configuration": "FAIL"}


def test_the_configuration_is_named_with_config_as_by_every_command_or_as_a_path(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "check-config", "--config", str(config)]) == 0
    with_option = capsys.readouterr().out
    assert main(["node", "check-config", str(config)]) == 0
    assert capsys.readouterr().out == with_option
    assert "OK" in with_option
    code = main(["node", "check-config", str(config), "--config", str(config)])
    assert code == 2
    assert "once" in capsys.readouterr().err


def test_a_node_certificate_near_its_end_warns_without_failing(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    expires = load_config(config).keys.node_certificate
    not_after = x509.load_pem_x509_certificate(expires.read_bytes()).not_valid_after_utc
    soon = {c.name: c for c in check_config(config, now=not_after - dt.timedelta(days=10))}
    assert soon["node certificate"].ok
    assert soon["node certificate"].warning
    assert (
        "10 day(s) left; renew it now with 'itmolink pki renew'" in soon["node certificate"].detail
    )
    later = {c.name: c for c in check_config(config, now=not_after - dt.timedelta(days=31))}
    assert later["node certificate"].ok
    assert not later["node certificate"].warning

    # Through the command: the certificate made by the fixture (a day or more ago) has
    # less than its full validity left, so it warns; renewed, it has all of it.
    monkeypatch.setattr(checkconfig, "RENEW_WITHIN", NODE_VALIDITY - dt.timedelta(hours=12))
    assert main(["node", "check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^WARN  node certificate +.*renew it now", out, flags=re.M)
    assert "checks passed, 1 with a warning" in out
    assert main(["pki", "renew", "--config", str(config)]) == 0
    assert main(["node", "check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^OK    node certificate ", out, flags=re.M)
    assert "warning" not in out
