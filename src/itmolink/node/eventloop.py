"""The node's event loop: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv) runs the loop's callbacks, futures and thread hand-offs with less CPU than
asyncio's pure-Python loop (DESIGN.md, "uvloop as the node's event loop"). It is a
dependency on the platforms it supports; elsewhere, or if it cannot be imported, the node
runs on asyncio's default loop, which behaves the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the node's event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
