"""The kit's parts on their own: driver templates, configuration errors, its identity."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import pytest

from itmolink.cli.main import main
from itmolink.conformance.config import (
    EXPIRED_KEY_FILE,
    FUTURE_KEY_FILE,
    KitConfigError,
    load_kit_config,
)
from itmolink.conformance.context import CheckFailed, Context
from itmolink.conformance.driver import Driver, DriverError
from itmolink.conformance.link import Link
from itmolink.crypto.pki import PartnerCard
from tests.conformance.harness import ONE_ROUND_SKEW_SECONDS, free_port, prepare


def test_driver_fills_placeholders_and_quotes_the_kits_values() -> None:
    driver = Driver(
        {"issue": "tool issue --config {cfg} --id {authorisation_id} --to {kit_party}"},
        {"cfg": "a b"},
        {"kit_party": "X K"},
    )
    command = driver.render("issue", {"authorisation_id": "X; rm -rf /"})
    # The operator's own [driver.vars] text is used as written; the kit's values
    # (the action's and kit_party, target_party, kit_endpoint) are quoted.
    assert command == "tool issue --config a b --id 'X; rm -rf /' --to 'X K'"


async def test_the_report_masks_driver_vars(tmp_path: Path) -> None:
    driver = Driver({"issue": "tool --token {token} --id {authorisation_id}"}, {"token": "s3cr3t"})
    driver.commands["issue"] = "true --token {token} --id {authorisation_id}"
    result = await driver.run("issue", authorisation_id="A-1")
    assert result.ok
    assert "s3cr3t" in result.command
    assert result.shown == "true --token <token> --id A-1"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended; only its parent's wait is missing.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


async def _wait_gone(pid: int) -> bool:
    for _ in range(50):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["driver time-out", "test cancelled"])
async def test_a_driver_command_leaves_no_process_behind(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "pid"
    command = f"sleep 37 & echo $! > {pidfile}; wait"
    driver = Driver({"issue": command}, {}, timeout=0.5 if how == "driver time-out" else 30.0)
    task = asyncio.ensure_future(driver.run("issue"))
    for _ in range(250):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    child = int(pidfile.read_text())
    if how == "driver time-out":
        result = await task
        assert (result.ok, result.output) == (False, "timed out after 0.5 s")
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await _wait_gone(child), f"the command's child {child} still runs after the {how}"


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


def test_conformance_init_lists_an_expired_and_a_future_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["conformance", "init", "--party", "XKT", "--dir", str(tmp_path / "kit")]) == 0
    assert "pin it only in a test deployment" in capsys.readouterr().out
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
    ctx = Context(config=config, link=None, server=None, driver=None)  # type: ignore[arg-type]
    ctx.transfers = {
        "XKT-T-1": KitTransfer("XKT-T-1", "XKT", "LAO", "A", moved=True, final_at_target=True),
        "XKT-T-2": KitTransfer("XKT-T-2", "XKT", "LAO", "A", final_at_target=True),
        "XKT-T-3": KitTransfer("XKT-T-3", "XKT", "LAO", "A", final_at_target=True, voided=True),
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


def test_the_kits_status_report_of_a_targets_proposal_says_what_the_kit_answered(
    tmp_path: Path,
) -> None:
    """For a transfer the target proposed the kit is the receiver (PROTOCOL §5.11): a
    proposal it holds back unanswered is UNKNOWN (it recorded nothing; a receiver never
    holds PROPOSED), one it accepted in two phases ACCEPTED until the completion arrives,
    one it answered with completed = true COMPLETED at once, one it refused REJECTED."""
    from itmolink.conformance.context import Context, KitTransfer
    from itmolink.conformance.link import Incoming
    from itmolink.conformance.runner import _status_report
    from itmolink.v1 import transfer_pb2

    config = load_kit_config(prepare(tmp_path).kit_config)
    ctx = Context(config=config, link=None, server=None, driver=None)  # type: ignore[arg-type]
    assert (ctx.kit, ctx.target) == ("XKT", "LAO")
    ctx.transfers = {
        t: KitTransfer(t, "LAO", "XKT", "A")
        for t in ("LAO-T-held", "LAO-T-accepted", "LAO-T-one-round", "LAO-T-refused")
    }
    ctx.transfers["LAO-T-completed"] = KitTransfer(
        "LAO-T-completed", "LAO", "XKT", "A", moved=True, final_at_target=True
    )
    ctx.transfers["LAO-T-refused"].final_at_target = True
    ctx.notes["acceptances"] = {
        t: b"digest"
        for t in ("LAO-T-accepted", "LAO-T-one-round", "LAO-T-completed", "LAO-T-unrecorded")
    }
    ctx.notes["completed_on_acceptance"] = {"LAO-T-one-round"}

    def state(transfer_id: str) -> str:
        query = transfer_pb2.TransferStatusQuery(transfer_id=transfer_id)
        report = _status_report(ctx, Incoming(b"", "", b"", query, 0.0))
        return transfer_pb2.TransferState.Name(report.state)  # type: ignore[attr-defined]

    assert {t: state(t) for t in [*ctx.transfers, "LAO-T-unrecorded", "LAO-T-other"]} == {
        "LAO-T-held": "TRANSFER_STATE_UNKNOWN",
        "LAO-T-accepted": "TRANSFER_STATE_ACCEPTED",
        "LAO-T-one-round": "TRANSFER_STATE_COMPLETED",
        "LAO-T-refused": "TRANSFER_STATE_REJECTED",
        "LAO-T-completed": "TRANSFER_STATE_COMPLETED",
        # Accepted by the kit's policy before the test recorded the transfer.
        "LAO-T-unrecorded": "TRANSFER_STATE_ACCEPTED",
        "LAO-T-other": "TRANSFER_STATE_UNKNOWN",
    }


def test_the_configuration_refuses_a_wait_that_is_not_positive(tmp_path: Path) -> None:
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    setup.kit_config.write_text(text.replace("act_within_seconds = 15.0", "act_within_seconds = 0"))
    with pytest.raises(KitConfigError, match=r"act_within_seconds must be positive"):
        load_kit_config(setup.kit_config)
    setup.kit_config.write_text(text.replace("[kit]\n", "[kit]\ndriver_timeout_seconds = 600\n"))
    assert load_kit_config(setup.kit_config).driver_timeout_seconds == 600.0


def test_the_one_round_statements_are_flags_false_by_default(tmp_path: Path) -> None:
    setup = prepare(tmp_path, one_round=True)
    text = setup.kit_config.read_text()
    config = load_kit_config(setup.kit_config)
    assert (config.completes_on_acceptance, config.asks_complete_on_acceptance) == (True, True)
    assert config.max_clock_skew_seconds == ONE_ROUND_SKEW_SECONDS
    lines = [line for line in text.splitlines() if "_on_acceptance" not in line]
    setup.kit_config.write_text("\n".join(lines) + "\n")
    config = load_kit_config(setup.kit_config)
    assert (config.completes_on_acceptance, config.asks_complete_on_acceptance) == (False, False)
    setup.kit_config.write_text(
        text.replace("completes_on_acceptance = true", 'completes_on_acceptance = "yes"')
    )
    with pytest.raises(KitConfigError, match=r"completes_on_acceptance must be true or false"):
        load_kit_config(setup.kit_config)
    setup.kit_config.write_text(
        text.replace(
            f"max_clock_skew_seconds = {ONE_ROUND_SKEW_SECONDS}", "max_clock_skew_seconds = 0"
        )
    )
    with pytest.raises(KitConfigError, match=r"max_clock_skew_seconds must be positive"):
        load_kit_config(setup.kit_config)


def test_the_withdrawal_statements_default_to_the_references(tmp_path: Path) -> None:
    """[target] withdraws_one_round (true) and withdrawal_grace_seconds (30 s, the
    reference's default) for test 3.09 (PROTOCOL §6.11 S7)."""
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    text = "\n".join(line for line in text.splitlines() if "withdraw" not in line) + "\n"
    setup.kit_config.write_text(text)
    config = load_kit_config(setup.kit_config)
    assert (config.withdraws_one_round, config.withdrawal_grace_seconds) == (True, 30.0)
    for line, error in (
        ("withdraws_one_round = 1", "withdraws_one_round must be true or false"),
        ("withdrawal_grace_seconds = -1", "withdrawal_grace_seconds must be 0 or more"),
    ):
        setup.kit_config.write_text(text.replace("[target]\n", f"[target]\n{line}\n"))
        with pytest.raises(KitConfigError, match=error):
            load_kit_config(setup.kit_config)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (("rate_burst = 200\n", ""), r"give both rate_per_second and rate_burst, or none"),
        (("transfer_items_burst = 2000\n", ""),
         r"give both transfer_items_per_second and transfer_items_burst, or none"),
        (("transfer_items_per_second = 1000", "transfer_items_per_second = 0"),
         r"transfer_items_per_second must be positive"),
    ],
)  # fmt: skip
def test_the_configuration_takes_an_agreed_rate_or_budget_whole(
    tmp_path: Path, edit: tuple[str, str], error: str
) -> None:
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    config = load_kit_config(setup.kit_config)
    assert (config.transfer_items_per_second, config.transfer_items_burst) == (1000, 2000)
    assert edit[0] in text
    setup.kit_config.write_text(text.replace(*edit))
    with pytest.raises(KitConfigError, match=error):
        load_kit_config(setup.kit_config)


def test_role_host_without_driver_commands_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    setup.kit_config.write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("issue ="))
    )
    args = ["conformance", "run", "--target", "127.0.0.1:1", "--config", str(setup.kit_config)]
    assert main([*args, "--role", "host"]) == 2
    assert "role host needs a [driver] command for issue" in capsys.readouterr().err


def test_a_kit_that_cannot_listen_exits_with_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    setup.kit_config.write_text(
        text.replace(f'listen = "127.0.0.1:{setup.kit_port}"', 'listen = "192.0.2.1:5"')
    )
    args = ["conformance", "run", "--target", "127.0.0.1:1", "--config", str(setup.kit_config)]
    assert main([*args, "--role", "buyer"]) == 2
    assert "the kit cannot listen on '192.0.2.1:5'" in capsys.readouterr().err


async def test_1_02_fails_when_the_target_is_down(tmp_path: Path) -> None:
    """Refusing the stranger's certificate is not enough: the kit's own must get in."""
    from itmolink.conformance import stages

    config = load_kit_config(prepare(tmp_path).kit_config)
    link = Link(config, f"127.0.0.1:{free_port()}")
    ctx = Context(config=config, link=link, server=None, driver=None)  # type: ignore[arg-type]
    test = next(t for t in stages.TESTS if t.id == "1.02-unpinned-client-refused")
    started = time.monotonic()
    try:
        with pytest.raises(CheckFailed, match="a status query right after"):
            await test.run(ctx)
    finally:
        await link.close()
    assert time.monotonic() - started < 30


def test_stage_4_cuts_after_every_proposal_and_expects_a_tombstones_leaf(
    tmp_path: Path,
) -> None:
    from itmolink.conformance import stages
    from itmolink.conformance.context import KitTransfer
    from itmolink.node.convert import to_us

    config = load_kit_config(prepare(tmp_path).kit_config)
    ctx = Context(config=config, link=None, server=None, driver=None)  # type: ignore[arg-type]
    ahead = to_us(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4))  # a target clock ahead
    moved = KitTransfer("LAO-T-1", "LAO", "XKT", "A", final_at_target=True, proposed_at_us=ahead)
    tombstone = KitTransfer(
        "XKT-T-2", "XKT", "LAO", "A", final_at_target=True, voided=True,
        proposed_at_us=to_us(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)),
    )  # fmt: skip
    ctx.transfers = {t.transfer_id: t for t in (moved, tombstone)}
    assert stages._snapshot_at(ctx) == ahead + 1
    leaf = {"LAO-T-1": moved.blocks_leaf()}
    stages._compare_leaves(
        ctx, {**leaf, "XKT-T-2": tombstone.blocks_leaf()}, lambda r: r.blocks_leaf(), "blocks"
    )
    with pytest.raises(CheckFailed, match="XKT-T-2 is missing"):  # it stands at proposal_sent_at
        stages._compare_leaves(ctx, leaf, lambda r: r.blocks_leaf(), "blocks")
    with pytest.raises(CheckFailed, match="XKT-T-2 \\(not moved\\) differs"):
        stages._compare_leaves(
            ctx, {**leaf, "XKT-T-2": b"x" * 32}, lambda r: r.blocks_leaf(), "blocks"
        )
    with pytest.raises(CheckFailed, match="LAO-T-1 is missing"):
        stages._compare_leaves(ctx, {}, lambda r: r.blocks_leaf(), "blocks")


async def test_a_failure_names_the_deliveries_the_kit_refused_meanwhile(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from itmolink.conformance.runner import FAILED, _run_one
    from itmolink.conformance.stages import KitTest

    config = load_kit_config(prepare(tmp_path).kit_config)
    server = SimpleNamespace(refused=["old: before the test"])
    ctx = Context(config=config, link=None, server=server, driver=None)  # type: ignore[arg-type]

    async def failing(ctx: Context) -> None:
        ctx.server.refused.append("Rejected: signature does not verify")
        raise CheckFailed("no TransferProposal reached the kit")

    result = await _run_one(KitTest("9.99-x", 1, "§0", "x", ("buyer",), failing), ctx)
    assert result.status == FAILED
    assert result.message == (
        "no TransferProposal reached the kit [the kit refused 1 delivery(ies) of the target: "
        "Rejected: signature does not verify]"
    )


async def test_the_kit_refuses_the_keys_the_target_card_lists_as_revoked(tmp_path: Path) -> None:
    """The kit pins the target's card as a node does: with its [[revoked_keys]]."""
    import dataclasses

    config = load_kit_config(prepare(tmp_path).kit_config)
    card = config.target_card
    since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    retired = card.signing_keys[0].key_id
    revoked_card = PartnerCard(
        card.party, card.registry, card.ca_certificate_pem, card.signing_keys,
    ).revoking(retired, since, since)  # fmt: skip
    link = Link(dataclasses.replace(config, target_card=revoked_card), "127.0.0.1:1")
    try:
        assert link.trust.is_revoked(retired)
        assert link.trust.revocations() == {retired: since}
    finally:
        await link.close()


def test_3_26_dates_its_proposals_by_the_targets_grace_and_skew(tmp_path: Path) -> None:
    """PROTOCOL §7.7, §5.8 T1b: with room between G and the target's max_clock_skew, the
    proposals of test 3.26 expire halfway between them in the past (left waiting once
    accepted); without, 2 s ahead, and G is waited out. The two knobs' defaults are the
    reference's G and I."""
    from itmolink.conformance.stages import left_waiting_expiry

    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    config = load_kit_config(setup.kit_config)
    assert (config.status_query_grace_seconds, config.status_query_interval_seconds) == (30, 60)
    assert left_waiting_expiry(config) == (-dt.timedelta(seconds=165), 0.0)
    setup.kit_config.write_text(
        text.replace("max_clock_skew_seconds = 300", "max_clock_skew_seconds = 45")
    )
    assert left_waiting_expiry(load_kit_config(setup.kit_config)) == (dt.timedelta(seconds=2), 32)
    setup.kit_config.write_text(
        text.replace("[target]\n", "[target]\nstatus_query_grace_seconds = 0\n")
    )
    assert left_waiting_expiry(load_kit_config(setup.kit_config)) == (-dt.timedelta(seconds=150), 0)
    for key, value, error in (
        ("status_query_grace_seconds", "-1", "must be 0 or more"),
        ("status_query_interval_seconds", "0", "must be positive"),
    ):
        setup.kit_config.write_text(text.replace("[target]\n", f"[target]\n{key} = {value}\n"))
        with pytest.raises(KitConfigError, match=f"{key} {error}"):
            load_kit_config(setup.kit_config)


async def test_3_26_takes_a_second_query_only_once_the_first_is_answered_and_i_passed(
    tmp_path: Path,
) -> None:
    """With a short I ([target] status_query_interval_seconds), 3.26 waits for the next
    query about the transfer it reported PROPOSED: none, one created less than I after
    the first (by their sent_at), or one that came while the first was unanswered fails."""
    from itmolink.conformance import stages
    from itmolink.conformance.link import Incoming, KitServer
    from itmolink.node.convert import timestamp
    from itmolink.v1 import common_pb2, transfer_pb2

    setup = prepare(tmp_path, act_within=0.3)
    text = setup.kit_config.read_text()
    setup.kit_config.write_text(
        text.replace("[target]\n", "[target]\nstatus_query_interval_seconds = 0.2\n")
    )
    config = load_kit_config(setup.kit_config)
    ctx = Context(config=config, link=None, server=KitServer(config, None), driver=None)  # type: ignore[arg-type]
    base = int(time.time() * 1_000_000)

    def query(message_id: str, sent_after: float, received_at: float) -> Incoming:
        header = common_pb2.Header(
            message_id=message_id, sent_at=timestamp(base + int(sent_after * 1_000_000))
        )
        message = transfer_pb2.TransferStatusQuery(header=header, transfer_id="XKT-T-1")
        return Incoming(b"", stages.STATUS_QUERY, b"", message, received_at)

    first = query("m1", 0.0, 1.0)
    answered = {"m1": 2.0}
    ctx.server.received.append(first)
    with pytest.raises(CheckFailed, match="did not ask again about XKT-T-1"):
        await stages._asked_again(ctx, first, answered)
    ctx.server.received[1:] = [query("m2", 0.1, 3.0)]
    with pytest.raises(CheckFailed, match=r"0\.10 s after its first .* interval I of 0\.2 s"):
        await stages._asked_again(ctx, first, answered)
    ctx.server.received[1:] = [query("m2", 0.25, 1.5)]
    with pytest.raises(CheckFailed, match="while its first one was unanswered"):
        await stages._asked_again(ctx, first, answered)
    ctx.server.received[1:] = [query("m2", 0.25, 3.0)]
    await stages._asked_again(ctx, first, answered)


async def test_3_09_checks_each_void_it_waits_for(tmp_path: Path) -> None:
    """The checks of test 3.09 on the target's void of a one-round proposal left
    unanswered (PROTOCOL §6.11 S7, §5.10): none within the wait, one sent before
    expires_at + 2 × max_clock_skew (by its sent_at, or on the kit's clock), one naming
    a request in in_reply_to or without the proposal's sent_at, each fail; a void in
    time with the proposal's sent_at passes."""
    from itmolink.conformance import stages
    from itmolink.conformance.link import Incoming, KitServer
    from itmolink.node.convert import timestamp
    from itmolink.v1 import common_pb2, transfer_pb2

    setup = prepare(tmp_path, act_within=0.3, one_round=True)
    config = load_kit_config(setup.kit_config)
    ctx = Context(config=config, link=None, server=KitServer(config, None), driver=None)  # type: ignore[arg-type]
    skew = config.max_clock_skew_seconds
    sent_us = int(time.time() * 1_000_000) - 60_000_000
    proposal = transfer_pb2.TransferProposal(
        header=common_pb2.Header(message_id="p1", sent_at=timestamp(sent_us)),
        transfer_id="LAO-T-1", expires_at=timestamp(sent_us + 2_000_000),
    )  # fmt: skip
    # First delivered 60 s ago on the kit's clock: the wait for the void is short.
    delivered = time.monotonic() - 60
    first = Incoming(b"", "itmolink.v1.TransferProposal", b"", proposal, delivered)

    def void(
        after_s: float, *, seen_s: float | None = None, in_reply_to: str = "",
        proposal_sent_us: int | None = sent_us,
    ) -> Incoming:  # fmt: skip
        """A void sent ``after_s`` after the proposal (by its sent_at), received
        ``seen_s`` after the proposal's first delivery (default: the same)."""
        header = common_pb2.Header(
            message_id="v1", sent_at=timestamp(sent_us + int(after_s * 1_000_000)),
            in_reply_to=in_reply_to,
        )  # fmt: skip
        message = transfer_pb2.TransferVoid(header=header, transfer_id="LAO-T-1")
        if proposal_sent_us is not None:
            message.proposal_sent_at.CopyFrom(timestamp(proposal_sent_us))
        seen = after_s if seen_s is None else seen_s
        return Incoming(b"", stages.VOID, b"", message, delivered + seen)

    with pytest.raises(CheckFailed, match="no TransferVoid of the one-round transfer LAO-T-1"):
        await stages._withdrawal_of(ctx, first)
    on_time = 2 + 2 * skew + 0.5
    cases = [
        (void(2 + 2 * skew - 0.5), "before expires_at \\+ 2 × max_clock_skew_seconds"),
        (void(on_time, seen_s=2 + 2 * skew - 2.5), "before expires_at"),
        (void(on_time, proposal_sent_us=None), "the void's proposal_sent_at is unset"),
        (void(on_time, proposal_sent_us=sent_us + 1), "not the proposal's sent_at"),
        (void(on_time, in_reply_to="p1"), "names 'p1' in in_reply_to"),
    ]
    for incoming, error in cases:
        ctx.server.received[:] = [incoming]
        with pytest.raises(CheckFailed, match=error):
            await stages._withdrawal_of(ctx, first)
    ctx.server.received[:] = [void(on_time)]
    await stages._withdrawal_of(ctx, first)


@pytest.mark.parametrize("first_stage", ["not run", "failed"])
async def test_a_test_that_does_not_apply_stops_no_later_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_stage: str
) -> None:
    """§13.4: a test reported as not run in a stage that ran (it does not apply to the
    target) leaves the stage passed and the next stage runs; a failed one stops it."""
    from itmolink.conformance import runner
    from itmolink.conformance.context import NotRunnable
    from itmolink.conformance.stages import KitTest

    async def passes(ctx: Context) -> None:
        return None

    async def other(ctx: Context) -> None:
        if first_stage == "failed":
            raise CheckFailed("broken")
        raise NotRunnable("does not apply")

    tests = [
        KitTest("1.01-a", 1, "§1", "passes", ("buyer",), passes),
        KitTest("1.02-b", 1, "§1", first_stage, ("buyer",), other),
        KitTest("2.01-c", 2, "§2", "passes", ("buyer",), passes),
    ]
    monkeypatch.setattr(runner, "tests_for", lambda role: tests)
    setup = prepare(tmp_path)
    report = await runner.run_kit(load_kit_config(setup.kit_config), "127.0.0.1:1", "buyer")
    statuses = [r.status for r in report.results]
    if first_stage == "failed":
        assert statuses == [runner.PASSED, runner.FAILED, runner.NOT_RUN]
        assert (report.stage_status(1), report.passed) == (runner.FAILED, False)
    else:
        assert statuses == [runner.PASSED, runner.NOT_RUN, runner.PASSED]
        assert (report.stage_status(1), report.passed) == (runner.PASSED, True)
