"""Prometheus metrics of the server (rank 0): requests, latency, time to
first token, tokens, queue depth, the batch (running and waiting requests,
sequences per step, KV cache bytes), and how the routed tokens spread over the
experts and ranks of every MoE layer.

Each app has its own registry, so several servers in one process (tests)
never share counts. The engine thread records through `track`; the expert
load is the engine's snapshot, so a scrape never touches MLX."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...parallel.placement import spread

# A generation takes from tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, float("inf"))
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, float("inf"))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.paths = set()  # the app's routes; other paths count as "other", so scanners cannot add series
        r = self.registry
        self.requests = Counter("mlx_moe_requests", "HTTP responses started, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("mlx_moe_request_latency_seconds",
                                 "Generation requests: seconds from queueing to the end of the answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mlx_moe_time_to_first_token_seconds",
                              "Generation requests: seconds from queueing to the first piece of the answer",
                              buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mlx_moe_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=r)
        self.cached_tokens = Counter("mlx_moe_prompt_cached_tokens", "Prompt tokens of finished generations "
                                     "read from the prefix cache (usage.prompt_tokens_details.cached_tokens)",
                                     registry=r)
        self.generated_tokens = Counter("mlx_moe_generated_tokens", "Tokens generated (usage.completion_tokens)",
                                        registry=r)
        self.tokens_per_second = Gauge("mlx_moe_generation_tokens_per_second",
                                       "Decode rate of the last finished generation of 2+ tokens", registry=r)
        self.queue_depth = Gauge("mlx_moe_queue_depth", "Generation requests waiting or running", registry=r)
        self.running = Gauge("mlx_moe_requests_running", "Requests in the batch, as of the last step",
                             registry=r)
        self.waiting = Gauge("mlx_moe_requests_waiting", "Requests waiting for a place in the batch, "
                             "as of the last step", registry=r)
        self.batch_size = Histogram("mlx_moe_batch_size", "Sequences decoded together, per step that decoded",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.kv_cache_bytes = Gauge("mlx_moe_kv_cache_bytes", "Bytes of the batch's KV caches on a rank "
                                    "(with data-parallel attention each holds its own requests')", ["rank"],
                                    registry=r)
        self.kv_cache_peak_bytes = Gauge("mlx_moe_kv_cache_peak_bytes", "The most bytes of KV caches a rank "
                                         "has held after a step since the server started", ["rank"], registry=r)
        self.kv_peak = {}  # rank -> the gauge's value
        self.engine = engine
        engine.on_step = self.step
        r.register(ExpertLoadCollector(engine))

    def step(self, running: int, waiting: int, decoded: int, kv_bytes: int) -> None:
        """Called by the engine after each step."""
        self.running.set(running)
        self.waiting.set(waiting)
        for rank, held in enumerate(self.engine.kv_bytes):
            self.kv_cache_bytes.labels(str(rank)).set(held)
            if held > self.kv_peak.get(rank, -1):
                self.kv_peak[rank] = held
                self.kv_cache_peak_bytes.labels(str(rank)).set(held)
        if decoded:
            self.batch_size.observe(decoded)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.paths else "other", str(status)).inc()

    def track(self, emit):
        """`emit` (a job's event sink) wrapped to record the job: call when
        it is queued. Events arrive on the engine thread, before the client
        sees them, so a scrape after an answer always counts it."""
        return Tracked(self, emit)


class Tracked:
    """A job's event sink that records it; `refused()` if it never got queued."""

    def __init__(self, metrics: Metrics, emit):
        self.metrics, self.emit = metrics, emit
        self.start = time.perf_counter()
        self.first, self.open = True, True
        metrics.queue_depth.inc()

    def refused(self) -> None:
        self.open = False
        self.metrics.queue_depth.dec()

    def __call__(self, event) -> None:
        m = self.metrics
        if self.open:
            kind = event[0]
            if self.first and kind in ("text", "done"):
                self.first = False
                m.ttft.observe(time.perf_counter() - self.start)
            if kind in ("done", "error"):
                self.open = False  # a failing cluster may end a job twice
                m.queue_depth.dec()
                m.latency.observe(time.perf_counter() - self.start)
            if kind == "done":
                usage = event[2]
                m.prompt_tokens.inc(usage["prompt_tokens"])
                m.cached_tokens.inc(usage.get("cached_tokens", 0))
                m.generated_tokens.inc(usage["completion_tokens"])
                # One token gives no rate: mlx-lm times from the first token.
                if usage["completion_tokens"] > 1:
                    m.tokens_per_second.set(usage["generation_tps"])
        self.emit(event)


class CountRequests:
    """ASGI middleware: counts each response when it starts (its status is
    known then, and a client that has the answer finds it counted)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


class ExpertLoadCollector:
    """The engine's expert-load snapshot (`engine.expert_load`, a list of
    mlx_moe.parallel.expert.ExpertLoad) as metrics, computed at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        experts = CounterMetricFamily("mlx_moe_expert_tokens", "(token, expert) pairs routed to each expert",
                                      labels=["layer", "expert", "rank"])
        ranks = CounterMetricFamily("mlx_moe_rank_tokens", "(token, expert) pairs computed by each rank",
                                    labels=["layer", "rank"])
        imbalance = GaugeMetricFamily("mlx_moe_expert_load_imbalance",
                                      "Max over ranks / mean over ranks of the pairs each rank computed "
                                      "(1 = even)", labels=["layer"])
        size = self.engine.group.size()
        for load in self.engine.expert_load:
            for expert, (count, rank) in enumerate(zip(load.counts, load.owner)):
                experts.add_metric([load.path, str(expert), str(rank)], count)
            per_rank = load.rank_totals(size)
            for rank, count in enumerate(per_rank):
                ranks.add_metric([load.path, str(rank)], count)
            imbalance.add_metric([load.path], spread(per_rank))
        return [experts, ranks, imbalance]
