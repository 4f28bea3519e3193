"""The status page (GET /), its data (GET /v1/status) and GET /health:
the cluster and what each rank holds, the requests running and waiting
with tokens/s over time, the expert load per layer and rank with each
layer's imbalance, and the ranks' loading progress.

Everything comes from rank 0's engine, read without touching MLX: its
sharding plan, scheduler and expert-load snapshot (the one /metrics
serves). Hosts, memory and loading progress are not the engine's to know:
`cluster()` gives them, one dict per rank (see `status_router`). Before
the engine exists (engine None) the same routes serve the loading app
(loading.py), from what the launcher reports of each rank.
"""

import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, List, Optional

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from ...parallel.placement import spread

PAGE = Path(__file__).with_name("status.html")
HISTORY_SECONDS = 300


class Throughput:
    """Tokens generated per second, over the last `seconds`: fed by the
    engine's per-step hook (sequences decoded = tokens generated)."""

    def __init__(self, seconds: int = HISTORY_SECONDS, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: deque = deque(maxlen=seconds)  # [second, tokens]

    def add(self, tokens: int) -> None:
        now = int(self.clock())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == now:
                self._buckets[-1][1] += tokens
            else:
                self._buckets.append([now, tokens])

    def series(self) -> List[List[int]]:
        """[[unix second, tokens], ...] for every second of the window, zeros included."""
        now = int(self.clock())
        with self._lock:
            seen = dict(self._buckets)
        return [[t, seen.get(t, 0)] for t in range(now - self._buckets.maxlen + 1, now + 1)]


def _holdings(plan, size: int) -> List[dict]:
    """Per rank: experts held in each MoE layer (count and the plan's text)."""
    from ...parallel.plan import experts_text

    moe = plan.moe_layers if plan is not None else []
    ranks = []
    for r in range(size):
        held = [layer.experts_of(r) for layer in moe if r < len(layer.ranges)]
        ranks.append({"rank": r, "experts_per_layer": [len(e) for e in held],
                      "experts": experts_text(held[0]) if held else "-",
                      "shared_experts": any(l.shared and l.shared_rank == r for l in moe)})
    return ranks


def _state(engine, loading):
    """("loading" | "ready" | "failed", the failure or None)."""
    failure = engine.failure if engine else loading.failure
    return ("failed" if failure else "ready" if engine and engine.ready.is_set() else "loading"), failure


def status(engine, model_id: str, throughput: Throughput, cluster: Callable[[], List[dict]],
           started: float, loading=None) -> dict:
    extra = cluster()
    size = engine.group.size() if engine else len(extra)
    plan = getattr(engine.model, "sharding_plan", None) if engine else None
    ranks = _holdings(plan, size)
    for rank, more in zip(ranks, extra):
        rank.update(more)
    state, failure = _state(engine, loading)
    running, waiting = engine.scheduler.counts() if engine else (0, 0)
    now = time.perf_counter()
    requests = [{"prompt_tokens": len(a.job.prompt), "generated_tokens": a.tokens,
                 "max_tokens": a.job.max_tokens, "seconds": round(now - a.first, 1) if a.tokens else 0.0}
                for a in (list(engine.scheduler.running.values()) if engine else [])]
    layers = []
    for load in engine.expert_load if engine else []:
        totals = load.rank_totals(size)
        layers.append({"path": load.path, "counts": load.counts, "owner": load.owner,
                       "rank_totals": totals, "imbalance": round(spread(totals), 4)})
    return {
        "model": model_id, "state": state, "failure": failure,
        "uptime_seconds": round(time.time() - started, 1),
        "cluster": {"size": size, "strategy": plan.strategy if plan else None,
                    "reason": plan.reason if plan else None, "ranks": ranks},
        "requests": {"running": running, "waiting": waiting, "active": requests,
                     "tokens_per_second": throughput.series()},
        "experts": {"layers": layers},
    }


def status_router(engine, model_id: str, cluster: Optional[Callable[[], List[dict]]] = None,
                  loading=None) -> APIRouter:
    """GET / (the page), GET /v1/status (its data, also for scripts) and
    GET /health (200 only when the cluster serves).

    `cluster()` returns one dict per rank, merged into that rank's entry;
    the page shows `host`, `memory_bytes` / `memory_total_bytes` and, while
    loading, `loaded_bytes` / `load_total_bytes`, `stage` and `progress`
    (the rank's share of its loading done). `engine` None: the ranks are
    loading, and `loading` (loading.Loading) says how far and whether one
    failed. Chains the engine's `on_step` hook, so create it after anything
    else that sets it (app.py's Metrics)."""
    throughput = Throughput()
    if engine is not None:
        previous = engine.on_step

        def on_step(running, waiting, decoded, kv_bytes):
            previous(running, waiting, decoded, kv_bytes)
            throughput.add(decoded)

        engine.on_step = on_step
    started = time.time()
    cluster = cluster or (loading.ranks if loading else lambda: [])
    router = APIRouter()

    def current() -> dict:
        return status(engine, model_id, throughput, cluster, started, loading)

    @router.get("/health")
    async def health():
        state, failure = _state(engine, loading)
        if failure:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        if state == "loading":
            return JSONResponse({"status": "loading", "progress": loading.fraction() if loading else 1.0,
                                 "ranks": cluster()}, status_code=503)
        stalled = engine.stalled_for()
        if stalled > max(2 * engine.heartbeat, 10):
            return JSONResponse({"status": "stalled", "seconds": round(stalled)}, status_code=503)
        return {"status": "ok", "ranks": engine.group.size()}

    @router.get("/v1/status")
    def status_json():  # not async: building it (every layer and expert) stays off the event loop
        return current()

    @router.get("/", include_in_schema=False)
    def page():
        # Static: it holds no data, so it may be served without the API key
        # (it asks for the key when /v1/status answers 401).
        return FileResponse(PAGE, media_type="text/html")

    return router
