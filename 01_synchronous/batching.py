"""Server-side batching, the way TensorFlow Serving's --enable_batching does it.

Concurrent Predict calls for the same signature wait in a queue; the batch loop takes as many
rows as it can (up to max_batch_size), runs the model once, and hands each caller its slice.
One model call costs about the same for 1 row as for 100, so under load this multiplies the
throughput; with a single client it adds nothing but a queue hop (batch_timeout_micros=0 never
waits for a batch to fill, it just takes what has piled up while the previous batch ran).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
import numpy as np
from monitoring import ServingMetrics
from servable import ServingError, invalid

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchingParameters:
    """Same names and defaults as TensorFlow Serving's BatchingParameters proto."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1

    @classmethod
    def from_file(cls, path: str | Path) -> BatchingParameters:
        """Reads the ascii proto of --batching_parameters_file: `max_batch_size { value: 64 }`."""
        text = Path(path).read_text()
        found = dict(re.findall(r"(\w+)\s*\{\s*value\s*:\s*(\d+)\s*\}", text))
        known = {f.name for f in fields(cls)}
        unknown = set(found) - known
        if unknown:
            raise ValueError(f"{path}: unsupported batching parameters {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in found.items()})


@dataclass
class _Task:
    inputs: Inputs
    rows: int
    future: asyncio.Future[Inputs]
    enqueued: float  # time.perf_counter(): the queuing latency's start


class Scheduler:
    """Runs Servable.run once per request, or once per batch when batching is enabled.

    The model runs on the event loop itself, not on a thread pool. For this model a call is
    about 0.5 ms, nearly all of it Python-side dispatch that holds the GIL; handing it to a
    thread and back cost more than it saved (measured: half the throughput, twice the latency,
    from GIL hand-offs between the loop and the worker thread). With batching, the loop pays
    that 0.5 ms once per batch, not once per request. So num_batch_threads is accepted for
    compatibility but batches run one at a time.
    """

    def __init__(
        self,
        run: Callable[[str, Inputs], Inputs],
        params: BatchingParameters | None,
        metrics: ServingMetrics,
    ):
        self._run = run
        self.params = params
        self.metrics = metrics
        self._queues: dict[str, deque[_Task]] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # model calls made for batches, and the requests they carried
        self.batched_requests = 0

    async def start(self) -> None:
        if self.params:
            self._worker = asyncio.create_task(self._batch_loop(self.params))

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def predict(self, signature_key: str, inputs: Inputs) -> Inputs:
        if not self.params:
            return self._run(signature_key, inputs)
        rows = len(next(iter(inputs.values())))
        if rows > self.params.max_batch_size:
            raise invalid(
                f"Task size {rows} is larger than maximum input batch size "
                f"{self.params.max_batch_size}"
            )
        queue = self._queues.setdefault(signature_key, deque())
        if len(queue) >= self.params.max_batch_size * self.params.max_enqueued_batches:
            raise ServingError(
                grpc.StatusCode.UNAVAILABLE,
                "The batch scheduling queue to which this task was submitted is full",
            )
        task = _Task(inputs, rows, asyncio.get_running_loop().create_future(), time.perf_counter())
        queue.append(task)
        self._wake.set()
        return await task.future

    async def _batch_loop(self, params: BatchingParameters) -> None:
        while True:
            await self._wake.wait()
            key = next((k for k, q in self._queues.items() if q), None)
            if key is None:
                self._wake.clear()
                continue
            queue = self._queues[key]
            if params.batch_timeout_micros and self._rows(queue) < params.max_batch_size:
                await asyncio.sleep(params.batch_timeout_micros / 1e6)  # let the batch fill
            batch, rows = [], 0
            while queue and rows + queue[0].rows <= params.max_batch_size:
                task = queue.popleft()
                batch.append(task)
                rows += task.rows
            self.batches += 1
            self.batched_requests += len(batch)
            self.metrics.batch_ran([t.enqueued for t in batch], time.perf_counter())
            merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
            try:
                outputs = self._run(key, merged)
            except Exception as exc:  # the whole batch failed: every caller gets the error
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(exc)
                continue
            start = 0
            for task in batch:
                if not task.future.done():  # the caller may have gone away
                    task.future.set_result(
                        {k: v[start : start + task.rows] for k, v in outputs.items()}
                    )
                start += task.rows
            await asyncio.sleep(0)  # let the callers answer before the next batch runs

    @staticmethod
    def _rows(queue: deque[_Task]) -> int:
        return sum(t.rows for t in queue)
