"""The one seam between the HTTP side and the engine: a thread that owns the device and runs queued jobs.

Today it batches the generate jobs waiting when the engine frees up, grouped by equal
`SamplingParams` (one `Engine.generate` call needs one set of controls), up to
`max_slots` sample rows; a continuous-batching scheduler replaces `Worker._serve`
and keeps `submit`, `Job` and its events. Tokens reach each request through its own
asyncio queue as the engine streams them (`on_token`); a cancelled job is no longer
fed (the static engine may still finish the batch it is in).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from llm.generate import SamplingParams
from llm.serve.metrics import Metrics


class QueueFull(Exception):
    """The bounded queue has no room: the request is refused at once (429), not parked."""


class Job:
    """One request's work: `prompts` under `sampling`, or a `call(engine)` to run on the device thread.

    Events on `events`: ("token", prompt_index, sample_index, token), ("done", result), ("error", message).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: Sequence[Sequence[int]] = (),
                 sampling: SamplingParams | None = None, call: Callable[[Any], Any] | None = None,
                 seeded: bool = True):
        self.loop, self.prompts, self.sampling, self.call = loop, [list(p) for p in prompts], sampling, call
        self.seeded = seeded  # False: any seed will do, so the job batches with others whatever their seed
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.admitted = time.monotonic()
        self.first_token_at: float | None = None
        self._last_token_at: dict[tuple[int, int], float] = {}

    @property
    def batch_key(self) -> SamplingParams | None:
        """Jobs with equal keys share one `generate` call; a seed only matters when asked for and sampling."""
        if self.sampling is None or (self.seeded and self.sampling.temperature > 0):
            return self.sampling
        return dataclasses.replace(self.sampling, seed=0)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.sampling.n if self.sampling else 1

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, *event) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """Runs `setup()` (load, compile, warm up; returns the engine), then serves jobs until `close()`."""

    def __init__(self, setup: Callable[[], Any], metrics: Metrics, max_slots: int = 8, max_queue: int = 64):
        self.setup, self.metrics, self.max_slots, self.max_queue = setup, metrics, max_slots, max_queue
        self.state, self.error = "loading", None  # -> "ready" or "failed"
        self.engine = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="engine-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job, admitted: bool = False) -> None:
        """Queues a job; a new request finding `max_queue` waiting is refused (`admitted`: part of one already in)."""
        with self._cond:
            if not admitted and len(self._waiting) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the queue holds {self.max_queue} requests already")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def _main(self) -> None:
        try:
            self.engine = self.setup()
        except Exception as error:  # the server stays up and says why in /health
            self.state, self.error = "failed", f"{type(error).__name__}: {error}"
            traceback.print_exc()
            return
        self.state = "ready"
        while (batch := self._take()) is not None:
            self._serve(batch)

    def _take(self) -> list[Job] | None:
        """The next batch: a call job alone, else the first job and the waiting ones with equal controls."""
        with self._cond:
            while not self._closed:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                if self._waiting:
                    break
                self.metrics.waiting.set(0)
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._waiting.popleft()]
            if batch[0].call is None:
                rows, kept = batch[0].rows, collections.deque()
                while self._waiting:
                    job = self._waiting.popleft()
                    if job.cancelled:
                        continue
                    fits = (job.call is None and job.batch_key == batch[0].batch_key
                            and rows + job.rows <= self.max_slots)
                    (batch if fits else kept).append(job)
                    rows += job.rows if fits else 0
                self._waiting = kept
            self.metrics.waiting.set(len(self._waiting))
            return batch

    def _serve(self, batch: list[Job]) -> None:
        self.metrics.running.set(len(batch))
        try:
            if batch[0].call is not None:
                batch[0].emit("done", batch[0].call(self.engine))
                return
            owners = [(job, i) for job in batch for i in range(len(job.prompts))]
            self.metrics.prompt_tokens.inc(sum(len(p) for job in batch for p in job.prompts))

            def on_token(prompt_index: int, sample_index: int, token: int) -> None:
                job, i = owners[prompt_index]
                self._observe(job, i, sample_index)
                job.emit("token", i, sample_index, token)

            sampling = batch[0].sampling
            if batch[0].batch_key != sampling:  # no seed asked for (or greedy): a fresh one per batch
                sampling = dataclasses.replace(sampling, seed=random.randrange(2**31))
            samples = self.engine.generate([p for job in batch for p in job.prompts], sampling, on_token)
            start = 0
            for job in batch:
                job.emit("done", samples[start:start + len(job.prompts)])
                start += len(job.prompts)
        except Exception as error:  # one bad batch answers its requests with the error; the worker goes on
            traceback.print_exc()
            for job in batch:
                job.emit("error", f"{type(error).__name__}: {error}")
        finally:
            self.metrics.running.set(0)

    def _observe(self, job: Job, i: int, j: int) -> None:
        now = time.monotonic()
        self.metrics.generation_tokens.inc()
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.admitted)
        last = job._last_token_at.get((i, j))
        if last is not None:
            self.metrics.itl.observe(now - last)
        job._last_token_at[(i, j)] = now
