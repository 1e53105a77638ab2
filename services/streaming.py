"""Streaming responses under the same call wrapper as unary ones.

A unary call runs inside one wrapper - ``Server.call`` for gRPC, ``openai_api``'s for HTTP -
which owns admission control, the deadline, the exception -> status mapping and the metrics.
``relay`` lets a streamed call reuse that wrapper unchanged instead of repeating it: the
wrapper runs a task that drains the event iterator into a queue, and the caller yields the
events as they arrive. So a stream holds its admission slot until its last event, its deadline
covers the whole stream, its status and latency land in the same metrics, and a client that
goes away (the caller closed or cancelled) cancels the task, which closes the iterator - and
the engine request in progress is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

Run = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""A call wrapper: given the work (a coroutine function), runs it with admission, deadline,
status mapping and metrics, and raises what the transport should see when it fails."""


async def relay(run: Run, events: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
    """Yield the events of ``events()`` in order while ``run`` wraps producing them; when the
    work fails, the events produced before the failure are yielded first, then ``run``'s
    exception is raised."""
    queue: asyncio.Queue[T] = asyncio.Queue()

    async def work() -> None:
        async with contextlib.aclosing(events()) as items:
            async for item in items:
                queue.put_nowait(item)

    task = asyncio.ensure_future(run(work))
    get: asyncio.Future[T] | None = None
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                yield get.result()
                continue
            get.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            await task  # the wrapper's outcome: None, or the exception it raises
            return
    finally:
        if get is not None and not get.done():
            get.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
