"""The node's event loop: uvloop when it is installed, asyncio's otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest

from itmolink.node import eventloop


async def _loop_class() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def _asyncio_default() -> str:
    loop = asyncio.new_event_loop()  # what asyncio.run would use (the policy's loop)
    try:
        return type(loop).__module__
    finally:
        loop.close()


def test_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert eventloop.loop_factory() is uvloop.new_event_loop
    assert eventloop.run(_loop_class()).startswith("uvloop")


def test_asyncio_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert eventloop.loop_factory() is None
    assert eventloop.run(_loop_class()) == _asyncio_default()
