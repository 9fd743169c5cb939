"""Waiting for a state, never for a time: tests poll until a condition holds, with a deadline
generous enough for a loaded CI machine, and fail with what they waited for."""
import asyncio
import time

DEADLINE_SECONDS = 60.0


def wait_until(condition, what: str, timeout: float = DEADLINE_SECONDS, interval: float = 0.02):
    """Call condition() until it returns something truthy; return that, or fail after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def until(condition, what: str, timeout: float = DEADLINE_SECONDS, interval: float = 0.02):
    """wait_until for coroutines: polls without blocking the event loop."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
