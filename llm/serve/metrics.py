"""The server's Prometheus metrics (`GET /metrics`): what vLLM exports (`vllm:num_requests_running`...) as `llm_*`.

Each app has its own registry, so several servers (tests) in one process do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Seconds; vLLM's buckets, cut to the range a small model on one device spans.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llm_requests_running", "Requests in the engine now.", registry=r)
        self.waiting = Gauge("llm_requests_waiting", "Requests queued for the engine.", registry=r)
        self.requests = Counter("llm_requests", "Requests finished, by outcome (done, error).", ["outcome"], registry=r)
        self.cancelled = Counter("llm_requests_cancelled", "Requests whose client went away before they finished.",
                                 registry=r)
        self.rejected = Counter("llm_requests_rejected", "Requests refused with 429: the queue was full.", registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of the requests run.", registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "From admission to a request's first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Between consecutive tokens of one sample.",
                             buckets=ITL_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
