"""Runs the conformance tests against a target, stage by stage.

As in the Kyoto ITL's initialisation test plan, every test of a stage must
pass before the next stage starts; the tests of later stages are reported as
not run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from itmolink.conformance.config import KitConfig, check_role
from itmolink.conformance.context import CheckFailed, Context, NotRunnable
from itmolink.conformance.driver import Driver
from itmolink.conformance.link import Incoming, KitServer, Link, default_answer
from itmolink.conformance.stages import STAGES, KitTest, tests_for
from itmolink.v1 import transfer_pb2

# How long one test may take besides its driver commands (a host test runs at most
# two, each of which may take [kit] driver_timeout_seconds).
TEST_TIMEOUT_SECONDS = 120.0

PASSED, FAILED, ERROR, NOT_RUN = "passed", "failed", "error", "not run"


@dataclass
class Result:
    test: KitTest
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class RunReport:
    role: str
    target: str
    kit_party: str
    target_party: str
    started: dt.datetime
    seconds: float = 0.0
    results: list[Result] = field(default_factory=list)
    driver_log: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No test failed or errored (tests not run come after a failure, or --stages)."""
        return any(r.status == PASSED for r in self.results) and not any(
            r.status in (FAILED, ERROR) for r in self.results
        )

    def by_status(self, status: str) -> list[Result]:
        return [r for r in self.results if r.status == status]

    def failed_ids(self) -> list[str]:
        return [r.test.id for r in self.results if r.status in (FAILED, ERROR)]

    def stage_status(self, stage: int) -> str:
        """Passed when no test of the stage failed and some passed: a test not run while
        the stage ran is optional or does not apply to the target (its driver command or
        an agreed value is not given, or the target states it does not do what it checks)."""
        statuses = {r.status for r in self.results if r.test.stage == stage}
        if not statuses:
            return "no tests"
        if statuses == {NOT_RUN}:
            return NOT_RUN
        return FAILED if statuses & {FAILED, ERROR} else PASSED


async def run_kit(
    config: KitConfig,
    target: str,
    role: str,
    *,
    stages: int = max(STAGES),
    progress: Callable[[Result], None] | None = None,
) -> RunReport:
    """Run the tests of ``role`` (the target's role) up to stage ``stages``.

    Raises KitConfigError when the configuration cannot serve ``role`` and OSError
    when the kit cannot listen."""
    check_role(config, role)
    report = RunReport(
        role=role,
        target=target,
        kit_party=config.party,
        target_party=config.target_party,
        started=dt.datetime.now(dt.UTC),
    )
    began = time.monotonic()
    link = Link(config, target)
    server = KitServer(config, link)
    server.default_policy = default_answer
    await server.start()
    host = config.listen.rsplit(":", 1)[0]
    driver = Driver(
        config.driver,
        config.driver_vars,
        {
            "kit_party": config.party,
            "target_party": config.target_party,
            "kit_endpoint": f"{host}:{server.port}",
        },
        timeout=config.driver_timeout_seconds,
    )
    ctx = Context(config=config, link=link, server=server, driver=driver)
    server.policies[str(transfer_pb2.TransferStatusQuery.DESCRIPTOR.full_name)] = lambda incoming: (
        _status_report(ctx, incoming)
    )
    blocked: int | None = None
    try:
        for stage in sorted(STAGES):
            tests = [t for t in tests_for(role) if t.stage == stage]
            for test in tests:
                if blocked is not None or stage > stages:
                    why = (
                        f"stage {blocked} did not pass"
                        if blocked is not None
                        else f"only stages up to {stages} were asked for"
                    )
                    result = Result(test, NOT_RUN, why)
                else:
                    result = await _run_one(test, ctx)
                report.results.append(result)
                if progress is not None:
                    progress(result)
            # A test not run in a stage that ran does not apply (stage_status).
            if blocked is None and any(
                r.status in (FAILED, ERROR) for r in report.results if r.test.stage == stage
            ):
                blocked = stage
    finally:
        await server.stop()
        await link.close()
        report.seconds = time.monotonic() - began
        # [driver.vars] masked: they may hold credentials (the report goes to CI artifacts).
        report.driver_log = [f"[{r.action}] exit {r.returncode}: {r.shown}" for r in driver.log]
    return report


def _status_report(ctx: Context, incoming: Incoming) -> Message:
    """The kit's own view of a transfer, for a target that asks (§5.11, §7.7).

    For a transfer the target proposed, the kit is the receiver: it holds it ACCEPTED
    only once it sent a two-phase acceptance (``notes["acceptances"]``) and no
    completion settled it, COMPLETED once it answered with ``completed = true``
    (``notes["completed_on_acceptance"]``, PROTOCOL §6.11) or recorded the completion,
    and nothing (UNKNOWN) while it holds the proposal unanswered: a receiver never holds
    PROPOSED."""
    transfer_id = str(incoming.message.transfer_id)  # type: ignore[attr-defined]
    record = ctx.transfers.get(transfer_id)
    accepted = transfer_id in ctx.notes.get("acceptances", {})
    if (record is not None and record.moved) or transfer_id in ctx.notes.get(
        "completed_on_acceptance", set()
    ):
        state = transfer_pb2.TRANSFER_STATE_COMPLETED
    elif record is not None and record.final_at_target:
        state = (
            transfer_pb2.TRANSFER_STATE_VOIDED
            if record.voided
            else transfer_pb2.TRANSFER_STATE_REJECTED
        )
    elif record is not None and record.sender == ctx.kit:
        state = transfer_pb2.TRANSFER_STATE_PROPOSED
    elif accepted:
        state = transfer_pb2.TRANSFER_STATE_ACCEPTED
    else:
        state = transfer_pb2.TRANSFER_STATE_UNKNOWN
    return transfer_pb2.TransferStatusReport(transfer_id=transfer_id, state=state)


async def _run_one(test: KitTest, ctx: Context) -> Result:
    started = time.monotonic()
    refused = len(ctx.server.refused)
    # Test 3.26 may have to wait out the target's grace G of status queries (PROTOCOL §7.7),
    # and 3.09 its withdrawal of one-round proposals (twice its skew and its grace, §6.11 S7).
    timeout = (
        TEST_TIMEOUT_SECONDS
        + 2 * ctx.config.driver_timeout_seconds
        + ctx.config.status_query_grace_seconds
        + 2 * ctx.config.max_clock_skew_seconds
        + ctx.config.withdrawal_grace_seconds
    )
    try:
        await asyncio.wait_for(test.run(ctx), timeout)
    except NotRunnable as exc:
        return Result(test, NOT_RUN, str(exc), time.monotonic() - started)
    except CheckFailed as exc:
        return Result(test, FAILED, _with_refusals(str(exc), ctx, refused), _since(started))
    except TimeoutError:
        message = _with_refusals(f"timed out after {timeout:.0f} s", ctx, refused)
        return Result(test, ERROR, message, _since(started))
    except Exception as exc:  # the test could not be carried out
        message = _with_refusals(f"{type(exc).__name__}: {exc}", ctx, refused)
        return Result(test, ERROR, message, _since(started))
    return Result(test, PASSED, "", _since(started))


def _since(started: float) -> float:
    return time.monotonic() - started


def _with_refusals(message: str, ctx: Context, seen: int) -> str:
    """The failure, and the target's deliveries the kit refused during the test
    (a message that fails the kit's checks never reaches the test itself)."""
    refused = ctx.server.refused[seen:]
    if not refused:
        return message
    shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
    return f"{message} [the kit refused {len(refused)} delivery(ies) of the target: {shown}]"
