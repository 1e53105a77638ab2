"""services/streaming.relay (no engine): a stream runs under a unary call wrapper - events in
order, the wrapper's error after the events produced before it, and a consumer that stops
cancels the work (which is how a disconnect aborts the engine request)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from p2r.services.streaming import relay


class Wrapper:
    """A call wrapper like Server.call: records how the work ended and maps errors."""

    def __init__(self) -> None:
        self.outcome: str | None = None

    async def __call__(self, work: Callable[[], Awaitable[Any]]) -> Any:
        try:
            result = await work()
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        except ValueError as e:
            self.outcome = "failed"
            raise RuntimeError(f"mapped: {e}") from None
        self.outcome = "ok"
        return result


def test_events_in_order_then_the_wrapper_returns() -> None:
    async def events() -> AsyncIterator[int]:
        for i in range(5):
            await asyncio.sleep(0)
            yield i

    async def main() -> list[int]:
        wrapper = Wrapper()
        out = [e async for e in relay(wrapper, events)]
        assert wrapper.outcome == "ok"
        return out

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_events_before_a_failure_come_first_then_the_mapped_error() -> None:
    async def events() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("bad image")

    async def main() -> list[int]:
        got: list[int] = []
        with pytest.raises(RuntimeError, match="mapped: bad image"):
            async for e in relay(Wrapper(), events):
                got.append(e)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_a_consumer_that_stops_cancels_the_work_and_closes_the_events() -> None:
    async def main() -> tuple[str | None, bool]:
        wrapper = Wrapper()
        done = asyncio.Event()

        async def events() -> AsyncIterator[int]:
            try:
                i = 0
                while True:
                    await asyncio.sleep(0.001)
                    yield i
                    i += 1
            finally:
                done.set()  # the engine request would be aborted here

        stream = relay(wrapper, events)
        async with contextlib.aclosing(stream):
            async for e in stream:
                if e == 3:
                    break
        await asyncio.wait_for(done.wait(), 5)
        return wrapper.outcome, done.is_set()

    assert asyncio.run(main()) == ("cancelled", True)
