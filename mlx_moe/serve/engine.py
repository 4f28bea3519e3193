"""The lockstep engine: every rank runs the same generations in the same
order; rank 0 decides what runs next and tells the others.

Between generations rank 0 broadcasts the next job (prompt tokens and
sampling settings) with two all_sums; the others wait for it. Inside a
generation nothing is exchanged but the model's own collectives: every rank
samples with the same seed from the same logits and applies the same stop
rules, so they finish on the same token without a per-token message.
"""

import json
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from .. import comm


@dataclass
class Job:
    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    # Called on rank 0 from the engine thread: ("text", str) per piece, then
    # ("done", finish_reason, usage) or ("error", message).
    emit: Callable = print

    def spec(self) -> dict:
        seed = self.seed if self.seed is not None else random.randrange(2**31)
        return dict(op="generate", prompt=self.prompt, max_tokens=self.max_tokens,
                    temperature=self.temperature, top_p=self.top_p, seed=seed, stop=self.stop)


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


class Engine:
    def __init__(self, model, tokenizer, group):
        self.model, self.tokenizer, self.group = model, tokenizer, group
        self.rank = group.rank()
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.ready = threading.Event()
        self.busy = False

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def shutdown(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        """The loop every rank runs until rank 0 says stop."""
        self.ready.set()
        while True:
            job = self.jobs.get() if self.rank == 0 else None
            spec = broadcast_json(
                (job.spec() if job else {"op": "shutdown"}) if self.rank == 0 else None, self.group
            )
            if spec["op"] == "shutdown":
                return
            self.busy = True
            try:
                self._generate(spec, job)
            except Exception as e:  # the same input fails the same way on every rank
                if job is not None:
                    job.emit(("error", f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False

    def _generate(self, spec: dict, job: Optional[Job]) -> None:
        emit = job.emit if job is not None else (lambda event: None)
        mx.random.seed(spec["seed"])
        sampler = make_sampler(temp=spec["temperature"], top_p=spec["top_p"])
        stops = StopMatcher(spec["stop"])
        finish, last = "length", None
        for last in stream_generate(self.model, self.tokenizer, mx.array(spec["prompt"]),
                                    max_tokens=spec["max_tokens"], sampler=sampler):
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
        emit(("done", finish, {
            "prompt_tokens": len(spec["prompt"]),
            "completion_tokens": completion,
            "total_tokens": len(spec["prompt"]) + completion,
            "generation_tps": last.generation_tps if last is not None else 0.0,
        }))
