"""Continuous batching in lockstep: the per-step plan and rank 0's side of it.

Every step, rank 0 writes a plan, a small piece of data: the requests that
join the batch (prompt tokens, max_tokens, sampling settings, a seed) and
the ids of those that leave (cancelled by their client, or a stop string
the front found). The step's exchange (exchange.py) gives it to every
rank, which applies it a step later to its mlx-lm BatchGenerator in the
same order, so the ids the generator assigns agree, and runs the same step.
End-of-sequence, stop token ids and max_tokens end a sequence inside the
generator, identically on every rank (they see the same tokens). Rank 0
sends each token id, with its log-probs, to its job (`Scheduler`); text
and stop strings live on the front (front/answers.py)."""

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..channel import QueueFull


CANCELLED = "cancelled: the client went away"


def token_logprobs(logprobs: mx.array, token: int, k: int) -> Tuple[int, float, List[Tuple[int, float]]]:
    """(token, its log-prob, the k most likely tokens and theirs, best first)
    from one step's log-probs over the vocabulary."""
    v = np.array(logprobs.astype(mx.float32))
    top = np.argpartition(-v, k - 1)[:k] if k else []
    return token, float(v[token]), [(int(t), float(v[t])) for t in sorted(top, key=lambda t: -v[t])]


@dataclass(eq=False)
class Active:
    """A request in the batch (rank 0)."""
    job: object
    tokens: int = 0
    first: float = 0.0  # when its first token came
    cached: int = 0  # prompt tokens the prefix cache held
    raw: Optional[deque] = None  # the model's own log-probs per step (Engine.capture_raw)


class Scheduler:
    """Rank 0: the waiting requests (at most `max_waiting`), the running ones
    (at most `max_running`), and the plan of each step."""

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.cond = threading.Condition()
        self.waiting: deque = deque()
        self.running: Dict[int, Active] = {}
        self.leaving: List[int] = []  # ids to remove in the next plan
        # Jobs of each plan sent but not yet applied (a plan is applied a step
        # after it is sent, exchange.py), oldest first, each in its plan's order.
        self.joining: deque = deque()
        self.stopping = False
        self.closed: Optional[str] = None  # why no job is taken any more (the cluster is lost)

    def submit(self, *jobs) -> None:
        """Queue `jobs` together, so that they join the batch in one step
        (a late joiner would cost a prompt batch left padding as long as
        the others' progress), or none of them: QueueFull. Once closed,
        each job gets the reason as its error instead."""
        with self.cond:
            # Checked under the lock close takes: a job is either drained by close or refused here.
            if self.closed is not None:
                for job in jobs:
                    job.emit(("error", self.closed))
                return
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise QueueFull.of(len(self.waiting), len(jobs), self.max_waiting)
            self.waiting.extend(jobs)
            self.cond.notify()

    def cancel(self, job) -> None:
        """The client went away: drop the job, or have it leave the batch at the next step."""
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.emit(("error", CANCELLED))
            else:
                job.cancelled = True

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def plan(self, timeout: float) -> dict:
        """The next step's plan; with nothing running or waiting, waits up to
        `timeout` for a request, then sends a ping (keeps the watchdogs fed)."""
        with self.cond:
            if not (self.running or self.leaving or self.waiting or self.joining or self.stopping):
                self.cond.wait(timeout)
            if self.stopping:
                return {"op": "shutdown"}
            for uid, active in list(self.running.items()):
                if active.job.cancelled:
                    self._leave(uid)
                    active.job.emit(("error", CANCELLED))
            free = self.max_running - len(self.running) - sum(len(jobs) for jobs in self.joining)
            joins = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            if joins:
                self.joining.append(joins)
            leaving, self.leaving = self.leaving, []
        if not (joins or leaving or self.running or self.joining):
            return {"op": "ping"}
        return {"op": "step", "add": [job.spec() for job in joins], "remove": leaving}

    def joined(self, uids: List[int], cached: List[int]) -> None:
        """The generator's ids for the jobs of the oldest plan not yet
        applied, and how many prompt tokens of each the prefix cache held."""
        for uid, job, n in zip(uids, self.joining.popleft(), cached):
            self.running[uid] = Active(job, cached=n)

    def _leave(self, uid: int) -> None:
        self.running.pop(uid, None)
        self.leaving.append(uid)

    def deliver(self, responses, before_done: Callable) -> None:
        """Each generated token to its job: ("token", token id, finish_reason or
        None, log-probs or None, prompt tokens the prefix cache held).
        `before_done` runs first when an answer ends (once per step)."""
        events, ended = [], False
        for r in responses:
            active = self.running.get(r.uid)
            if active is None:  # cancelled at this step
                continue
            active.tokens += 1
            if active.tokens == 1:
                active.first = time.perf_counter()
            k = active.job.logprobs
            step_logprobs = active.raw.popleft() if active.raw is not None else r.logprobs
            # End-of-sequence and stop token ids give no text, so no log-probs.
            logprobs = token_logprobs(step_logprobs, r.token, k) if k is not None and r.finish_reason != "stop" \
                else None
            if r.finish_reason:
                with self.cond:
                    if self.running.get(r.uid) is not active:  # a failure drained it: it has its error
                        continue
                    self.running.pop(r.uid)
                ended = True
            events.append((active.job, ("token", r.token, r.finish_reason, logprobs, active.cached)))
        if ended:
            before_done()
        for job, event in events:
            job.emit(event)

    def close(self, reason: str) -> list:
        """Take no more jobs (submit ends them with `reason`); every job not
        yet answered, waiting or running, for the caller to end with
        `reason`: none are left."""
        with self.cond:
            self.closed = reason
            jobs = [a.job for a in self.running.values()] + list(self.waiting)
            jobs += [job for joins in self.joining for job in joins]
            self.running.clear()
            self.waiting.clear()
            self.joining.clear()
            return jobs

    def counts(self):
        """(running, waiting): a job of a plan not yet applied still waits."""
        return len(self.running), len(self.waiting) + sum(len(jobs) for jobs in self.joining)
