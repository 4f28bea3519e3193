"""Rank 0's end of the channel to the front (channel.py): the front's jobs
go into the engine, and each job's events and each step's counts go back.

Token ids in, token ids and log-probs out: the front built the prompt and
makes the text; rank 0 schedules and samples. A step's tokens leave in
one message, with its counts. A lost front (its process ended) stops
the cluster: nobody could be answered."""

import threading
import time

from ...parallel.expert import expert_loads
from ..channel import Cancel, Event, Failed, Job, Loads, Ready, Step, Submit, connect
from .core import Engine

class FrontLink:
    def __init__(self, engine: Engine, ready: Ready):
        self.engine = engine
        self.conn = connect()
        self.lock = threading.Lock()  # the engine thread and this one both send
        self.jobs = {}  # id -> Job in the engine
        self.tokens = []  # (id, event): this step's token events, sent with its counts
        self.loads = None  # the expert loads last sent
        self.send(ready)
        self.send(Loads(expert_loads(engine.model)))  # zeros, before the engine thread runs (it evaluates)
        engine.on_step = self.on_step
        threading.Thread(target=self._read, daemon=True, name="front").start()

    def send(self, message) -> None:
        try:
            with self.lock:
                self.conn.send(message)
        except OSError:
            pass  # the front is gone: _read stops the cluster

    def failed(self, reason: str, elsewhere: bool) -> None:
        """The last message: why the cluster stops (the front ends the streams)."""
        self.send(Failed(reason, elsewhere))

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.engine.fail("the front process went away (mlx-moe serve exited): stopping")
                return
            if isinstance(message, Submit):
                jobs = []
                for id, spec in zip(message.ids, message.jobs):
                    job = Job(**spec, emit=lambda event, id=id: self._emit(id, event))
                    self.jobs[id] = job
                    jobs.append(job)
                self.engine.submit(*jobs)
            elif isinstance(message, Cancel) and message.id in self.jobs:
                self.engine.cancel(self.jobs[message.id])

    def _emit(self, id: int, event: tuple) -> None:
        if event[0] == "token" and not event[2]:
            self.tokens.append((id, event))  # the engine thread's, until on_step
            return
        self.jobs.pop(id, None)
        if self.engine.failure:
            return  # Failed says why; the front ends the job, naming the rank if the launcher can
        if event[0] == "token":
            self._send_loads()  # an answer's end comes after the loads that count it
            self.tokens.append((id, event))
        else:
            self.send(Event(id, event))

    def _send_loads(self) -> None:
        if self.engine.expert_load is not self.loads:
            self.loads = self.engine.expert_load
            self.send(Loads(self.loads))

    def on_step(self, running: int, waiting: int, decoded: int, kv_bytes: int) -> None:
        now = time.perf_counter()
        active = [(id, a.tokens, now - a.first if a.tokens else 0.0) for id, a in self._running()]
        self._send_loads()
        tokens, self.tokens = self.tokens, []
        self.send(Step(tokens, running, waiting, decoded, list(self.engine.kv_bytes), active))

    def _running(self):
        ids = {job: id for id, job in list(self.jobs.items())}
        return [(ids[a.job], a) for a in list(self.engine.scheduler.running.values()) if a.job in ids]
