"""The faulty variants of our node that the kit must catch in role host (the target
transfers out), each in the test that checks the rule it breaks: test_kit.py's check,
in a module of its own so that `make test` (pytest-xdist, --dist loadfile) runs these
beside test_kit.py's buyer variants, on the other worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.faulty import VARIANTS, Variant
from tests.conformance.test_kit import check_variant

HOST_VARIANTS = [v for v in VARIANTS if v.role == "host"]


@pytest.mark.parametrize("variant", HOST_VARIANTS, ids=[v.name for v in HOST_VARIANTS])
async def test_the_kit_catches_each_faulty_host_variant(
    tmp_path: Path, variant: Variant, monkeypatch: pytest.MonkeyPatch
) -> None:
    await check_variant(tmp_path, variant, monkeypatch)
