"""The worker seam on its own (a fake engine): what waits when the engine frees up runs as one `generate` call,
grouped by compatible controls, within --max-slots rows; a cancelled job is skipped; an error reaches every job."""

import asyncio
import threading

import pytest

from llm.generate import Sample, SamplingParams
from llm.serve.metrics import Metrics
from llm.serve.worker import Job, QueueFull, Worker


class FakeEngine:
    """Records each call; the first call (the warm-up of a real server) holds until `release`."""

    def __init__(self):
        self.calls, self.held, self.release = [], threading.Event(), threading.Event()

    def generate(self, prompts, sampling, on_token=None):
        self.calls.append(([list(p) for p in prompts], sampling))
        if len(self.calls) == 1:
            self.held.set()
            assert self.release.wait(30)
        if any(p == [666] for p in prompts):
            raise RuntimeError("bad prompt")
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                on_token(i, j, prompt[0] + 1)
        return [[Sample([p[0] + 1], [0.0], [False], "length") for _ in range(sampling.n)] for p in prompts]


async def _drain(job):
    events = []
    while not events or events[-1][0] not in ("done", "error"):
        events.append(await asyncio.wait_for(job.events.get(), 30))
    return events


def test_waiting_jobs_batch_by_controls_within_the_slots():
    async def main():
        loop, engine = asyncio.get_running_loop(), FakeEngine()
        worker = Worker(lambda: engine, Metrics(), max_slots=4, max_queue=5)
        worker.start()
        greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
        warm = SamplingParams(max_new_tokens=1, temperature=0.7, seed=3)
        first = Job(loop, [[1]], greedy)
        worker.submit(first)
        await asyncio.to_thread(engine.held.wait, 30)
        jobs = [Job(loop, [[10]], greedy, seeded=False), Job(loop, [[20]], warm),  # another group
                Job(loop, [[30], [31]], greedy.__class__(max_new_tokens=1, temperature=0.0, seed=9)),  # seed moot
                Job(loop, [[40]], SamplingParams(max_new_tokens=1, temperature=0.7, seed=4)),  # another seed
                Job(loop, [[50], [51]], greedy)]  # would pass --max-slots with the greedy ones: next batch
        for job in jobs:
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(Job(loop, [[60]], greedy))
        cancelled = jobs[3]
        cancelled.cancel()
        engine.release.set()
        results = [await _drain(job) for job in [first, jobs[0], jobs[1], jobs[2], jobs[4]]]
        worker.close()
        assert [c[0] for c in engine.calls] == [[[1]], [[10], [30], [31]], [[20]], [[50], [51]]]
        assert engine.calls[2][1] == warm  # a seed asked for is kept
        assert results[3][:2] == [("token", 0, 0, 31), ("token", 1, 0, 32)] and results[3][2][0] == "done"
        assert cancelled.events.empty()

    asyncio.run(main())


def test_an_engine_error_reaches_each_job_and_the_worker_goes_on():
    async def main():
        loop, engine = asyncio.get_running_loop(), FakeEngine()
        engine.release.set()
        worker = Worker(lambda: engine, Metrics(), max_slots=4, max_queue=4)
        worker.start()
        bad = Job(loop, [[666]], SamplingParams(max_new_tokens=1, temperature=0.0))
        worker.submit(bad)
        assert (await _drain(bad))[-1] == ("error", "RuntimeError: bad prompt")
        good = Job(loop, [[5]], SamplingParams(max_new_tokens=1, temperature=0.0))
        worker.submit(good)
        assert (await _drain(good))[-1][0] == "done"
        worker.close()

    asyncio.run(main())


def test_a_failed_load_is_the_workers_state():
    worker = Worker(lambda: (_ for _ in ()).throw(OSError("no weights")), Metrics())
    worker.start()
    worker._thread.join(30)
    assert worker.state == "failed" and "no weights" in worker.error
