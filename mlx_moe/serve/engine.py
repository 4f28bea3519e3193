"""The lockstep engine: every rank runs the same generations in the same
order; rank 0 decides what runs next and tells the others.

Between generations rank 0 broadcasts the next job (prompt tokens and
sampling settings) with two all_sums; the others wait for it. Inside a
generation nothing is exchanged but the model's own collectives: every rank
samples with the same seed from the same logits and applies the same stop
rules, so they finish on the same token without a per-token message.
"""

import faulthandler
import json
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .. import comm
from ..expert import expert_loads
from ..failures import lost_peer, rank_failed
from ..loader import log


@dataclass
class Job:
    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    logit_bias: Dict[int, float] = field(default_factory=dict)
    # Called on rank 0 from the engine thread: ("text", str) per piece, then
    # ("done", finish_reason, usage) or ("error", message).
    emit: Callable = print

    def spec(self) -> dict:
        seed = self.seed if self.seed is not None else random.randrange(2**31)
        return dict(op="generate", prompt=self.prompt, max_tokens=self.max_tokens,
                    temperature=self.temperature, top_p=self.top_p, seed=seed, stop=self.stop,
                    logit_bias=[[k, v] for k, v in self.logit_bias.items()])


def broadcast_json(obj, group) -> dict:
    """Rank 0's `obj` on every rank (others pass None)."""
    # The last generation's queued step must finish before these collectives.
    comm.settle()
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8) if obj is not None else None
    n = comm.all_sum(mx.array([len(data) if data is not None else 0], dtype=mx.int32), group)
    n = int(n.item())
    buf = mx.array(data) if data is not None else mx.zeros((n,), dtype=mx.uint8)
    out = comm.all_sum(buf, group)
    return json.loads(bytes(np.array(out)).decode())


class StopMatcher:
    """Holds back text that may be the start of a stop string, and finds
    the first complete one."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str):
        """(text safe to emit now, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((len(s) - 1 for s in self.stops), default=0)
        # Keep the longest tail that is a prefix of some stop string.
        cut = len(self.pending)
        for k in range(min(keep, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                cut = len(self.pending) - k
                break
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


NOTICE_WAIT = 3.0
LOAD_REFRESH = 1.0  # seconds between expert-load snapshots while jobs are queued


def clear_cache_without_gil(clear_cache=mx.clear_cache):
    """mx.clear_cache waits for queued work holding the GIL (mlx 0.32); mlx-lm
    calls it every 256 tokens, so a peer that stalled during that wait froze
    every thread of the rank, the watchdog too. Waiting first in
    mx.synchronize, which releases the GIL, leaves it nothing to wait for."""
    def clear():
        comm.settle()
        clear_cache()
    clear.without_gil = True
    return clear


class Engine:
    """Runs on every rank. Rank 0 takes jobs from `submit` and broadcasts
    each; when idle it broadcasts a ping every `heartbeat` seconds so every
    rank keeps seeing the cluster alive. A watchdog stops the process when
    the cluster makes no progress for `watchdog` seconds while this rank is
    waiting on it (a stalled or lost rank), instead of spinning forever."""

    def __init__(self, model, tokenizer, group, heartbeat: float = 5.0, watchdog: float = 60.0):
        self.model, self.tokenizer, self.group = model, tokenizer, group
        self.rank = group.rank()
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.ready = threading.Event()
        self.heartbeat, self.watchdog = heartbeat, watchdog
        self.current: Optional[Job] = None
        self.open_responses = 0  # HTTP responses still being written (rank 0)
        self.failure: Optional[str] = None  # set once the cluster is lost
        self.notice: Optional[str] = None  # why, when the launcher knows (a rank exited)
        self.noticed = threading.Event()
        self.expert_load = []  # ExpertLoad per MoE block, a recent snapshot (rank 0, for /metrics)
        self._load_time = 0.0
        self.on_failure = lambda reason: os._exit(3)
        self._progress = time.monotonic()
        self._waiting = False  # inside a collective or a generation
        self._done = False

    def submit(self, job: Job) -> None:
        if self.failure:
            job.emit(("error", self.failure))
            return
        self.jobs.put(job)

    def shutdown(self) -> None:
        self.jobs.put(None)

    def fail(self, reason: str, error: Optional[Exception] = None) -> None:
        """The cluster is lost: end the job in flight with `reason`, refuse
        new ones, and let `on_failure` stop this rank. `error`: this rank's
        own failure, reported for the launcher to pass on."""
        if self.failure:
            return
        self.failure = reason
        job = self.current
        if job is not None:
            job.emit(("error", reason))
        while not self.jobs.empty():
            pending = self.jobs.get_nowait()
            if pending is not None:
                pending.emit(("error", reason))
        # Logged after the clients are told: stderr is a pipe that may block.
        if error is not None:
            rank_failed(self.rank, error)
        else:
            log(f"[rank {self.rank}] {reason}")
        self.on_failure(reason)

    def fail_with_notice(self, reason: str) -> None:
        """Fail, naming the failed rank if the launcher says which within
        NOTICE_WAIT seconds (it reads mlx.launch's log)."""
        self.noticed.wait(NOTICE_WAIT)
        self.fail(self.notice or reason)

    def stalled_for(self) -> float:
        """Seconds this rank has waited on the cluster without progress."""
        return time.monotonic() - self._progress if self._waiting else 0.0

    def _tick(self, *_) -> None:
        self._progress = time.monotonic()

    def _watch(self) -> None:
        while self.failure is None and not self._done:
            # Last resort if a native call holds the GIL through a stall, so
            # this thread cannot run: dump every thread's stack and exit.
            faulthandler.dump_traceback_later(self.watchdog * 2 + 10, exit=True)
            time.sleep(min(1.0, self.watchdog / 4))
            stalled = time.monotonic() - self._progress
            if self._waiting and stalled > self.watchdog:
                self.fail(f"no progress from the cluster for {stalled:.0f} s: "
                          "a rank is stalled or unreachable; stopping")
        faulthandler.cancel_dump_traceback_later()

    def run(self) -> None:
        """The loop every rank runs until rank 0 says stop."""
        if not getattr(mx.clear_cache, "without_gil", False):
            mx.clear_cache = clear_cache_without_gil()
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        self._snapshot_load()
        self.ready.set()
        while True:
            job = spec = None
            if self.rank == 0:
                try:
                    job = self.jobs.get(timeout=self.heartbeat)
                    spec = job.spec() if job else {"op": "shutdown"}
                except queue.Empty:
                    spec = {"op": "ping"}
            self._tick()
            self._waiting = True
            spec = broadcast_json(spec, self.group)
            self._tick()
            if spec["op"] == "shutdown":
                self._done = True
                return
            if spec["op"] == "generate":
                self.current = job
                try:
                    self._generate(spec, job)
                except Exception as e:
                    if lost_peer(e):
                        self.fail_with_notice(f"lost the cluster ({e})")
                    else:
                        # It may have failed on this rank only (out of memory,
                        # a Metal error), the others waiting inside this step's
                        # collectives: no rank can go on in step, so the
                        # cluster stops, saying which rank failed and why.
                        self.fail(f"rank {self.rank} failed: {type(e).__name__}: {e}", error=e)
                self.current = None
            # Other ranks keep waiting on rank 0; rank 0 now waits on its queue.
            self._waiting = self.rank != 0

    def _snapshot_load(self) -> None:
        # On the engine thread, because counting evaluates MLX arrays; before
        # an answer's end is sent, so a scrape after it includes its tokens
        # (the wait is the step mlx-lm computed ahead, at most); while jobs
        # are queued, at most every LOAD_REFRESH s.
        now = time.monotonic()
        if self.rank == 0 and (self.jobs.empty() or now - self._load_time >= LOAD_REFRESH):
            self.expert_load, self._load_time = expert_loads(self.model), now

    def _generate(self, spec: dict, job: Optional[Job]) -> None:
        emit = job.emit if job is not None else (lambda event: None)
        mx.random.seed(spec["seed"])
        sampler = make_sampler(temp=spec["temperature"], top_p=spec["top_p"])
        processors = make_logits_processors(logit_bias=dict(spec["logit_bias"]))
        stops = StopMatcher(spec["stop"])
        finish, last = "length", None
        for last in stream_generate(self.model, self.tokenizer, mx.array(spec["prompt"]),
                                    max_tokens=spec["max_tokens"], sampler=sampler,
                                    logits_processors=processors, prompt_progress_callback=self._tick):
            self._tick()
            text, stopped = stops.feed(last.text)
            if text:
                emit(("text", text))
            if stopped:
                finish = "stop"
                break
            if last.finish_reason:
                finish = last.finish_reason
        else:
            rest = stops.flush()
            if rest:
                emit(("text", rest))
        completion = last.generation_tokens if last is not None else 0
        self._snapshot_load()
        emit(("done", finish, {
            "prompt_tokens": len(spec["prompt"]),
            "completion_tokens": completion,
            "total_tokens": len(spec["prompt"]) + completion,
            "generation_tps": last.generation_tps if last is not None else 0.0,
        }))
