"""The kit's parts on their own: driver templates, configuration errors, its identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from itmolink.cli.main import main
from itmolink.conformance.config import (
    EXPIRED_KEY_FILE,
    FUTURE_KEY_FILE,
    KitConfigError,
    load_kit_config,
)
from itmolink.conformance.driver import Driver, DriverError
from itmolink.crypto.pki import PartnerCard
from tests.conformance.harness import prepare


def test_driver_fills_placeholders_and_quotes_the_kits_values() -> None:
    driver = Driver({"issue": "tool issue --config {cfg} --id {authorisation_id}"}, {"cfg": "a b"})
    command = driver.render("issue", {"authorisation_id": "X; rm -rf /"})
    # The operator's own [driver.vars] text is used as written; the kit's values are quoted.
    assert command == "tool issue --config a b --id 'X; rm -rf /'"


def test_driver_refuses_a_missing_action_or_an_unknown_placeholder() -> None:
    driver = Driver({"issue": "tool {nope}"}, {})
    with pytest.raises(DriverError, match="unknown placeholder"):
        driver.render("issue", {})
    with pytest.raises(DriverError, match="no \\[driver\\] authorise"):
        driver.render("authorise", {})


async def test_driver_reports_the_exit_status() -> None:
    driver = Driver({"ok": "exit 0", "refuse": "echo refused; exit 3"}, {})
    assert (await driver.run("ok")).ok
    result = await driver.run("refuse")
    assert (result.ok, result.returncode, result.output.strip()) == (False, 3, "refused")


def test_conformance_init_lists_an_expired_and_a_future_key(tmp_path: Path) -> None:
    assert main(["conformance", "init", "--party", "XKT", "--dir", str(tmp_path / "kit")]) == 0
    card = PartnerCard.load(tmp_path / "kit" / "card.toml")
    now = dt.datetime.now(dt.UTC)
    windows = [key.valid_at(now) for key in card.signing_keys]
    assert sorted(w or "valid" for w in windows) == ["expired", "not yet valid", "valid"]
    assert (tmp_path / "kit" / EXPIRED_KEY_FILE).exists()
    assert (tmp_path / "kit" / FUTURE_KEY_FILE).exists()


def test_a_bad_configuration_is_refused_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = prepare(tmp_path)
    config = load_kit_config(setup.kit_config)
    assert (config.party, config.target_party) == ("XKT", "LAO")
    broken = tmp_path / "broken.toml"
    broken.write_text('[kit]\nkeys = "kit"\n')
    with pytest.raises(KitConfigError, match=r"\[target\] card is required"):
        load_kit_config(broken)
    code = main(
        ["conformance", "run", "--target", "127.0.0.1:1", "--role", "host", "--config", str(broken)]
    )
    assert code == 2
    assert "[target] card is required" in capsys.readouterr().err
