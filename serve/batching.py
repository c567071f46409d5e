"""Micro-batching of concurrent requests: many HTTP requests, one engine call.

Requests put their (already validated) query on an asyncio queue and await a future.
One collector task takes the first waiting query, then keeps collecting until
``max_batch`` queries are in hand or ``max_wait_ms`` has passed since the first, and
runs the batch on a single worker thread (the engine is used by one thread at a time).
On a GPU a batch of 64 costs little more than a batch of 1, so a ~2 ms wait buys
throughput; on the CPU the service uses ``max_wait_ms=0``: it runs whatever is already
queued at once, never waiting for more.

A full queue (``max_queue``) refuses new work with ``QueueFullError`` (the service
answers 503) instead of letting a flood grow memory without bound, and a query that
waits longer than its ``timeout`` gets ``QueueTimeoutError`` (also 503). A caller that
goes away (its task cancelled: the client disconnected) cancels its future, and the
collector drops it before its batch runs: no work is done for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


# (max_batch, max_wait_ms) by device: the service's defaults (serve.app, serve.deployment)
GPU_BATCHING = (64, 2.0)
CPU_BATCHING = (16, 0.0)


def default_batching(on_gpu: bool) -> tuple[int, float]:
    """(max_batch, max_wait_ms) of the service on a GPU or on the CPU."""
    return GPU_BATCHING if on_gpu else CPU_BATCHING


class QueueFullError(RuntimeError):
    """The batch queue holds ``max_queue`` waiting queries already."""


class QueueTimeoutError(RuntimeError):
    """A query waited longer than its deadline for its batch to finish."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """``await submit(item)`` -> ``run_batch([items])[i]``, with concurrent items batched.

    ``run_batch(items) -> (results, info)`` runs on the worker thread; ``info`` (a dict,
    e.g. timings) is returned to every caller of the batch together with its size and
    queue wait: ``submit`` returns ``(result, info)``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], tuple[list[Any], dict]],
        *,
        max_batch: int = GPU_BATCHING[0],
        max_wait_ms: float = GPU_BATCHING[1],
        max_queue: int = 1024,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1e3
        self.max_queue = int(max_queue)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.items = 0
        self.dropped = 0  # queued queries whose caller had gone when their batch formed

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: Any, timeout: float | None = None) -> tuple[Any, dict]:
        """Queue ``item``; its ``(result, info)``. ``QueueFullError`` at once when the
        queue is full, ``QueueTimeoutError`` after ``timeout`` seconds without a result."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() has not run")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue} queries are waiting already") from None
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout)  # cancels the future on timeout
        except asyncio.TimeoutError:
            raise QueueTimeoutError(
                f"the query waited {timeout:g} s for the engine without an answer"
            ) from None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]  # callers that went away
            self.dropped += len(batch) - len(live)
            if live:
                await self._run(loop, live)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results, info = await loop.run_in_executor(
                self._executor, self.run_batch, [p.item for p in batch]
            )
        except Exception as err:  # one failed batch must not stop the collector
            log.exception("batch of %d failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        self.batches += 1
        self.items += len(batch)
        for p, result in zip(batch, results):
            if not p.future.done():
                queue_ms = (started - p.enqueued) * 1e3
                p.future.set_result(
                    (result, {**info, "batch_size": len(batch), "queue_ms": queue_ms})
                )
