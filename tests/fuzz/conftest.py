"""Fixtures and the hypothesis profile of the fuzz tests.

``HYPOTHESIS_PROFILE=long`` (set by ``make fuzz``) selects the long run: each test then uses
the ``long`` example count of its ``fuzz_settings`` (tests/fuzz/strategies.py) instead of the
bounded one ``make test`` uses. The profile is registered here so that hypothesis' own
``--hypothesis-profile=long`` gives the same defaults to any other test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from .strategies import LONG
from .support import World, build_world

settings.register_profile("long", deadline=None, max_examples=5_000, print_blob=True)
if LONG:
    settings.load_profile("long")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A fresh LAO/KOR world for one test function (examples reset it as they need)."""
    built = build_world(tmp_path)
    yield built
    built.close()


@pytest.fixture(autouse=True)
def _quiet_engine_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Every refused input is logged at WARNING or ERROR; thousands of examples would make
    # pytest's captured-log report unreadable and slow.
    caplog.set_level(logging.CRITICAL, logger="itmolink")
