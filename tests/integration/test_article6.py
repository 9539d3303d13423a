"""Article 6 rules wired into running nodes: levies and sharing at issuance,
uses and cancellations, the AEF tables and the adjusted balance."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.cli.main import main
from itmolink.v1 import common_pb2

from .conftest import acknowledged, eventually, link, start_registry, stop_registry

ACCOUNTING = """
[accounting]
method = "averaging"
ndc_first_year = 2021
ndc_last_year = 2030
target_year = 2030
target_emissions = {target}
[accounting.reported_emissions]
2025 = {reported}
"""


async def test_an_a64_issuance_pays_its_levies_shares_with_the_buyer_and_is_reported(
    pki: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lao = await start_registry(
        pki("LAO", ["KOR"], extra=ACCOUNTING.format(target=62_000_000, reported=61_000_000))
    )
    kor = await start_registry(
        pki("KOR", ["LAO"], extra=ACCOUNTING.format(target=500_000_000, reported=600_000_000))
    )
    link(lao, kor)
    try:
        response = await lao.call(
            "Authorise",
            admin_pb2.AuthoriseRequest(
                activity_id="LAO-COOKSTOVES", activity_name="Energy",
                cooperative_approach_id="A6.4-LAO-0001", acquiring_parties=["KOR"],
                purposes=[common_pb2.PURPOSE_NDC], vintage_from=2021, vintage_to=2030,
                unit_type=common_pb2.UNIT_TYPE_A6_4ER_AUTHORISED, buyer_share_bp=8_000,
            ),
        )  # fmt: skip
        authorisation = response.authorisation_id
        await acknowledged(lao, authorisation)
        await lao.call(
            "Issue",
            admin_pb2.IssueRequest(authorisation_id=authorisation, vintage=2025, quantity=1_000),
        )

        # 5% share of proceeds (50) and 2% OMGE (20), rounded up; 80% of the other
        # 930 (744) goes to KOR at once as a first transfer; LAO keeps 186.
        async def kor_holds() -> int:
            return await kor.held()

        assert await eventually(kor_holds) == 744
        holdings = await lao.call("ListHoldings", admin_pb2.ListHoldingsRequest())
        by_account: dict[str, int] = {}
        for h in holdings.blocks:
            size = h.block.serial_end - h.block.serial_start + 1
            by_account[h.account] = by_account.get(h.account, 0) + size
        assert by_account == {"adaptation-fund": 50, "omge-cancellation": 20, "holding": 186}
        assert [(a.year, a.amount) for a in await lao.adjustments()] == [(2025, 744)]

        # KOR uses 100 toward its NDC for 2025 and cancels 44 voluntarily.
        for action, quantity in (("use-ndc", 100), ("voluntary-cancellation", 44)):
            code = await asyncio.to_thread(main, [
                "retire", action, "--config", str(kor.config_path), "--host", "LAO",
                "--authorisation", authorisation, "--vintage", "2025",
                "--quantity", str(quantity), "--use-year", "2025",
            ])  # fmt: skip
            assert code == 0, capsys.readouterr().err
        kor_holdings = await kor.call("ListHoldings", admin_pb2.ListHoldingsRequest())
        kor_accounts = sorted(
            (h.account, h.block.serial_end - h.block.serial_start + 1) for h in kor_holdings.blocks
        )
        assert kor_accounts == [
            ("holding", 600), ("retired-ndc", 100), ("voluntary-cancellation", 44)
        ]  # fmt: skip

        # LAO's AEF tables for this year (the actions above happened now): its
        # holdings frozen as those of 31 December.
        year = str(dt.datetime.now(dt.UTC).year)
        out = tmp_path / "aef"
        code = await asyncio.to_thread(main, [
            "report", "aef", "--config", str(lao.config_path), "--year", year, "--out", str(out),
        ])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [
            f"{year}-actions.csv", f"{year}-authorizations.csv",
            f"{year}-authorized-entities.csv", f"{year}-holdings.csv", f"{year}-submission.csv",
            f"aef-{year}.xlsx",
        ]  # fmt: skip
        with (out / f"{year}-actions.csv").open() as handle:
            actions = list(csv.reader(handle))
        text = "\n".join(",".join(row) for row in actions)
        assert "Mandatory cancellation to deliver OMGE" in text
        assert "Mandatory transfer to the Adaptation Fund (A6.4 ERs)" in text
        assert "First transfer to another Party" in text
        # Issuing more after the snapshot does not change the frozen holdings.
        before = (out / f"{year}-holdings.csv").read_bytes()
        await lao.call(
            "Issue", admin_pb2.IssueRequest(authorisation_id=authorisation, vintage=2025,
                                            quantity=500),
        )  # fmt: skip
        code = await asyncio.to_thread(main, [
            "report", "aef", "--config", str(lao.config_path), "--year", year, "--out",
            str(out), "--overwrite",
        ])  # fmt: skip
        assert code == 0
        assert (out / f"{year}-holdings.csv").read_bytes() == before

        async def kor_booked_both() -> bool:  # the second share reaches KOR asynchronously
            booked: int = sum(a.amount for a in await kor.adjustments())
            return booked == -1116

        await eventually(kor_booked_both)
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["report", "ca", "--config", str(kor.config_path)])
        assert code == 0
        printed = capsys.readouterr().out
        assert "2025" in printed
        assert "-1116" in printed  # KOR subtracts both shares: 744 + 372
    finally:
        await stop_registry(lao)
        await stop_registry(kor)
