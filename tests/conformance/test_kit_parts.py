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


def test_the_kit_answers_a_targets_status_query_from_its_own_record(tmp_path: Path) -> None:
    from itmolink.conformance.context import Context, KitTransfer
    from itmolink.conformance.link import Incoming
    from itmolink.conformance.runner import _status_report
    from itmolink.v1 import transfer_pb2

    config = load_kit_config(prepare(tmp_path).kit_config)
    ctx = Context(config=config, role="buyer", link=None, server=None, driver=None)  # type: ignore[arg-type]
    ctx.transfers = {
        "XKT-T-1": KitTransfer("XKT-T-1", "XKT", "LAO", "A", moved=True, final_at_target=True),
        "XKT-T-2": KitTransfer("XKT-T-2", "XKT", "LAO", "A", final_at_target=True),
        "XKT-T-3": KitTransfer(
            "XKT-T-3", "XKT", "LAO", "A", final_at_target=True, acceptance_digest=b"x"
        ),
        "XKT-T-4": KitTransfer("XKT-T-4", "XKT", "LAO", "A"),
    }
    states = {}
    for transfer_id in [*ctx.transfers, "XKT-T-9"]:
        query = transfer_pb2.TransferStatusQuery(transfer_id=transfer_id)
        report = _status_report(ctx, Incoming(b"", "", b"", query, 0.0))
        states[transfer_id] = transfer_pb2.TransferState.Name(report.state)  # type: ignore[attr-defined]
    assert states == {
        "XKT-T-1": "TRANSFER_STATE_COMPLETED",
        "XKT-T-2": "TRANSFER_STATE_REJECTED",
        "XKT-T-3": "TRANSFER_STATE_VOIDED",
        "XKT-T-4": "TRANSFER_STATE_PROPOSED",
        "XKT-T-9": "TRANSFER_STATE_UNKNOWN",
    }
