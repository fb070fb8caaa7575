"""Waiting on conditions, never on the clock.

A test that sleeps "long enough" for something to happen is a race: on a
loaded machine the sleep is too short and the test flakes, on an idle one it
wastes time. These helpers poll a condition at a short interval and return as
soon as it holds (with its value), or fail loudly, saying what was awaited,
once ``timeout`` has passed. The timeout is a bound on a hang, not a
measurement: make it generous.

``wait_until`` is for coroutines (the condition may be a plain function or a
coroutine function); ``poll_until`` is its blocking twin for code that runs
outside an event loop (starting a server process from a fixture).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

TIMEOUT_S = 10.0
INTERVAL_S = 0.01


def _describe(what: str | Callable[[], str], timeout: float, last: object) -> str:
    text = what() if callable(what) else what
    return f"timed out after {timeout:g} s waiting for {text} (last value: {last!r})"


@overload
async def wait_until(cond: Callable[[], Awaitable[T | None]], what: str | Callable[[], str], *,
                     timeout: float = ..., interval: float = ...) -> T: ...


@overload
async def wait_until(cond: Callable[[], T | None], what: str | Callable[[], str], *,
                     timeout: float = ..., interval: float = ...) -> T: ...


async def wait_until(cond: Callable[[], Any], what: str | Callable[[], str], *,
                     timeout: float = TIMEOUT_S, interval: float = INTERVAL_S) -> Any:
    """Poll ``cond`` until it returns something truthy, and return that.

    ``what`` names the awaited condition (a callable is called at the time out,
    to report the state then). The condition is evaluated at least once, and
    once more at the deadline, so a slow condition still gets its last chance.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        result = await value if inspect.isawaitable(value) else value
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(_describe(what, timeout, result))
        await asyncio.sleep(interval)


def poll_until(cond: Callable[[], T | None], what: str | Callable[[], str], *,
               timeout: float = TIMEOUT_S, interval: float = INTERVAL_S) -> T:
    """``wait_until`` for blocking code: poll ``cond`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_describe(what, timeout, result))
        time.sleep(interval)


async def wait_event(event: asyncio.Event, what: str, *, timeout: float = TIMEOUT_S) -> None:
    """Wait for ``event`` to be set, failing with ``what`` after ``timeout``."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
