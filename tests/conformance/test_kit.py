"""The conformance kit against our own node: the unmodified node passes in both
roles (through the command line, as CI and partners run it), and each faulty
variant fails, in the test that checks the rule it breaks."""

from __future__ import annotations

import asyncio
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from itmolink.conformance import stages
from itmolink.conformance.config import load_kit_config
from itmolink.conformance.runner import ERROR, FAILED, NOT_RUN, PASSED, run_kit
from itmolink.node import runtime
from itmolink.node.engine import Engine
from itmolink.v1 import partner_service_pb2_grpc, reply_pb2
from tests.conformance.faulty import (
    VARIANTS,
    Variant,
    _proposal_handler,
    _RewritesReplies,
    _swap,
)
from tests.conformance.harness import ITMOLINK, prepare, start_target

# A target asks a partner to complete on acceptance always or never (PROTOCOL §6.11 S1):
# role host runs once each way (3.04 and 3.08 check either).
RUNS = {"host": ("host", False), "host-one-round": ("host", True), "buyer": ("buyer", False)}


@pytest.mark.parametrize("run", list(RUNS))
async def test_our_node_conforms_in_both_roles(tmp_path: Path, run: str) -> None:
    role, one_round = RUNS[run]
    setup = prepare(tmp_path, one_round=one_round)
    node = await start_target(setup)
    junit, report = tmp_path / "junit.xml", tmp_path / "report.md"
    try:
        process = await asyncio.create_subprocess_exec(
            str(ITMOLINK), "conformance", "run", "--target",
            f"127.0.0.1:{node.partner_port}", "--role", role, "--config",
            str(setup.kit_config), "--junit", str(junit), "--report", str(report),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 240)
    finally:
        await node.stop(0.2)
    text = out.decode()
    sys.stdout.write(text)
    assert process.returncode == 0, text
    assert "CONFORMS" in text
    suites = ET.parse(junit).getroot()
    expected = stages.tests_for(role)
    assert int(suites.get("tests", "-1")) == len(expected)
    # 3.09 checks the withdrawal of one-round proposals (PROTOCOL §6.11 S7): not run
    # against a target that does not ask to complete on acceptance, and stage 4 runs.
    skipped = "1" if run == "host" else "0"
    assert (suites.get("failures"), suites.get("errors"), suites.get("skipped")) == (
        "0", "0", skipped,
    )  # fmt: skip
    names = [case.get("name", "") for case in suites.iter("testcase")]
    assert [n.split(" ")[0] for n in names] == [t.id for t in expected]
    assert all("§" in n for n in names), "every test names the PROTOCOL.md section it checks"
    assert "**conforms**" in report.read_text()


# The variants the kit must catch in role buyer; those of role host are run by
# test_kit_host_variants.py, a module of its own so that `make test` (pytest-xdist,
# --dist loadfile) can run the two halves on its two workers side by side.
BUYER_VARIANTS = [v for v in VARIANTS if v.role == "buyer"]


@pytest.mark.parametrize("variant", BUYER_VARIANTS, ids=[v.name for v in BUYER_VARIANTS])
async def test_the_kit_catches_each_faulty_variant(
    tmp_path: Path, variant: Variant, monkeypatch: pytest.MonkeyPatch
) -> None:
    await check_variant(tmp_path, variant, monkeypatch)


def test_every_variant_is_run_in_one_role() -> None:
    assert {v.role for v in VARIANTS} == {"buyer", "host"}


async def check_variant(tmp_path: Path, variant: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit fails ``variant``, in the test that checks the rule it breaks, for that
    reason, and nothing else."""
    setup = prepare(tmp_path, act_within=variant.act_within, one_round=variant.one_round)
    for owner, attribute, make in variant.core_patches:
        monkeypatch.setattr(owner, attribute, make(getattr(owner, attribute)))
    node = await start_target(setup, variant.patch)
    try:
        report = await run_kit(
            load_kit_config(setup.kit_config), f"127.0.0.1:{node.partner_port}", variant.role
        )
    finally:
        await node.stop(0.2)
    failed = {r.test.id: r.message for r in report.results if r.status == FAILED}
    print(f"{variant.name}: failed {sorted(failed)}")
    assert not report.passed, f"the kit passed {variant.name}, which {variant.rule}"
    assert variant.catches in failed, (
        f"{variant.name} should fail {variant.catches}; failed: {failed}, "
        f"errors: {[(r.test.id, r.message) for r in report.results if r.status == 'error']}"
    )
    assert variant.expect in failed[variant.catches], (
        f"{variant.name} should fail {variant.catches} for its fault ({variant.expect!r}), "
        f"not: {failed[variant.catches]}"
    )
    # A test that needs what a failed test should have set up is not run, not an error.
    errors = [(r.test.id, r.message) for r in report.results if r.status == ERROR]
    assert not errors, errors
    # Everything before the catching test's stage passed: the variant breaks one rule
    # (3.09 is not run against a target that does not ask to complete on acceptance).
    stage = next(r.test.stage for r in report.results if r.test.id == variant.catches)
    earlier = [r for r in report.results if r.test.stage < stage]
    assert all(r.status in (PASSED, NOT_RUN) for r in earlier), [
        (r.test.id, r.message) for r in earlier if r.status != PASSED
    ]
    later = [r for r in report.results if r.test.stage > stage]
    assert all(r.status == NOT_RUN for r in later)


async def test_the_kit_runs_again_against_the_same_target(tmp_path: Path) -> None:
    """§13.4: a second run against the same node passes too (new sequences, ids, serials)."""
    setup = prepare(tmp_path)
    node = await start_target(setup)
    try:
        for _ in range(2):
            report = await run_kit(
                load_kit_config(setup.kit_config), f"127.0.0.1:{node.partner_port}", "buyer"
            )
            assert report.passed, [(r.test.id, r.message) for r in report.results if r.message]
    finally:
        await node.stop(0.2)


class _OmitsOptionalDigest(_RewritesReplies):
    """Conforming: no envelope_digest on a Rejection that names the request in
    in_reply_to (§5.4: MUST only when in_reply_to is empty, SHOULD otherwise)."""

    def rewrite(self, message: Any) -> bool:
        if isinstance(message, reply_pb2.Rejection) and message.header.in_reply_to:
            message.envelope_digest = b""
            return True
        return False


async def test_the_kit_accepts_a_rejection_bound_by_in_reply_to_alone(tmp_path: Path) -> None:
    setup = prepare(tmp_path)
    node = await start_target(setup, lambda n: _swap(n, _OmitsOptionalDigest))
    try:
        report = await run_kit(
            load_kit_config(setup.kit_config), f"127.0.0.1:{node.partner_port}", "buyer"
        )
    finally:
        await node.stop(0.2)
    assert report.passed, [(r.test.id, r.message) for r in report.results if r.message]


class _OlderBuild(Engine):
    """Conforming: a build of before the one-round transfer, which does not know
    complete_on_acceptance and answers every proposal in two phases (PROTOCOL §6.11)."""

    _request_handlers: ClassVar[dict[str, Callable[..., bytes]]] = _proposal_handler(
        lambda engine, msg: msg.ClearField("complete_on_acceptance")
    )


async def test_the_kit_accepts_a_target_that_does_not_complete_on_acceptance(
    tmp_path: Path,
) -> None:
    """Stated in [target] (completes_on_acceptance = false), two-phase answers to
    one-round proposals pass 3.23 and 3.24, the kit completing them."""
    setup = prepare(tmp_path)
    text = setup.kit_config.read_text()
    setup.kit_config.write_text(
        text.replace("completes_on_acceptance = true", "completes_on_acceptance = false")
    )
    node = await start_target(setup, lambda n: _swap(n, _OlderBuild))
    try:
        report = await run_kit(
            load_kit_config(setup.kit_config), f"127.0.0.1:{node.partner_port}", "buyer"
        )
    finally:
        await node.stop(0.2)
    assert report.passed, [(r.test.id, r.message) for r in report.results if r.message]
    one_round = {r.test.id: r.status for r in report.results if "one-round" in r.test.id}
    ids = ["3.23-one-round-proposal", "3.24-one-round-settled", "3.25-one-round-expired"]
    assert one_round == dict.fromkeys(ids, PASSED)


def test_protocol_md_and_readme_give_the_number_of_variants() -> None:
    words = {
        23: "twenty-three", 24: "twenty-four", 25: "twenty-five", 26: "twenty-six",
        27: "twenty-seven", 28: "twenty-eight", 29: "twenty-nine", 30: "thirty",
        31: "thirty-one", 32: "thirty-two", 33: "thirty-three", 34: "thirty-four",
        35: "thirty-five", 36: "thirty-six", 37: "thirty-seven", 38: "thirty-eight",
        39: "thirty-nine", 40: "forty", 41: "forty-one", 42: "forty-two", 43: "forty-three",
        44: "forty-four", 45: "forty-five", 46: "forty-six", 47: "forty-seven",
        48: "forty-eight", 49: "forty-nine", 50: "fifty", 51: "fifty-one", 52: "fifty-two",
        53: "fifty-three", 54: "fifty-four", 55: "fifty-five", 56: "fifty-six",
    }  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    number = words[len(VARIANTS)]
    assert f"fails each of {number}" in (root / "docs" / "PROTOCOL.md").read_text()
    assert f"against {number}" in (root / "README.md").read_text()


class _DeliverOnly(runtime.PartnerServicer):
    """A target of before DeliverBatch: the method is not served (UNIMPLEMENTED)."""

    DeliverBatch = partner_service_pb2_grpc.PartnerServiceServicer.DeliverBatch  # type: ignore[assignment]


async def test_the_kit_accepts_a_target_without_deliver_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§2.6: serving DeliverBatch is optional; 1.18 passes on UNIMPLEMENTED."""
    setup = prepare(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "PartnerServicer", _DeliverOnly)
        node = await start_target(setup)
    try:
        report = await run_kit(
            load_kit_config(setup.kit_config), f"127.0.0.1:{node.partner_port}", "buyer"
        )
    finally:
        await node.stop(0.2)
    assert report.passed, [(r.test.id, r.message) for r in report.results if r.message]
    assert any(r.test.id == "1.18-deliver-batch" and r.status == PASSED for r in report.results)
