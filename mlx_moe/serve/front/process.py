"""The front process: `mlx-moe serve` itself, on the machine where it was
typed and on no engine core. It serves HTTP from the start (the loading
page while the ranks load), starts the ranks, and once rank 0's engine has
connected (channel.py) serves the API: templates, tokenizing, tool and
reasoning parsing, metrics and the status page live here; rank 0 gets
token ids and sends back token ids, log-probs and counts, which become
text here (answers.py). It outlives the
ranks: when they fail it ends every stream with the reason (naming the
rank, from the launcher's log), keeps /health saying why for a moment,
then exits non-zero."""

import os
import threading
import time
import types
from typing import Callable, Dict, List, Optional

from ...loader import load_tokenizer_of, log
from ..channel import Cancel, Event, Failed, Loads, QueueFull, Ready, Step, Submit, accept, address, job_fields, listen
from ..structured import Grammars
from .answers import Answer

# Seconds a failure rank 0 reports waits for the launcher to say which rank
# failed first; it ends when the launcher speaks (mlx.launch runs niced: slow under load).
NOTICE_WAIT = 10.0
FLUSH_WAIT = 5.0  # seconds open responses get to deliver their error
# Seconds /health keeps saying why after a failure, before the exit.
FAILED_LINGER = float(os.environ.get("MLX_MOE_FAILED_LINGER", "10"))
HTTP_STOP_SLACK = 1.0  # uvicorn's own steps around its graceful wait (a tick, a pause, cancelling)


class EngineClient:
    """The engine as app.py, metrics.py and status.py use it (engine.Engine's
    interface), over the channel to rank 0. Admission is checked here, so a
    full queue is a 429 at once: at most `max_running` jobs run and
    `max_waiting` wait, as rank 0's scheduler holds them."""

    def __init__(self, conn, ready: Ready, tokenizer, max_running: int, max_waiting: int):
        self.conn, self.tokenizer = conn, tokenizer
        self.grammars = Grammars(tokenizer)
        self.group = types.SimpleNamespace(size=lambda: len(ready.hosts))
        self.model = types.SimpleNamespace(sharding_plan=ready.plan)
        self.heartbeat = ready.heartbeat
        self.scheduler = self  # counts() and running, for the status page
        self.max_running, self.max_waiting = max_running, max_waiting
        self.lock = threading.Lock()
        self.jobs: Dict[int, Answer] = {}  # id -> the answer of a job sent and not ended
        self.running: Dict[int, types.SimpleNamespace] = {}  # id -> (job, tokens, first), from the last step
        self._counts = (0, 0)
        self.kv_bytes = [0] * len(ready.hosts)
        self.expert_load = []
        self.next_id = 0
        self.open_responses = 0  # HTTP responses still being written
        self.failure: Optional[str] = None
        self.notice: Optional[str] = None  # the launcher's word on which rank failed
        self.noticed = threading.Event()
        self.rank0_failed = False  # rank 0 sent Failed
        self.ready = threading.Event()
        self.on_step = lambda running, waiting, decoded, kv_bytes: None
        self.last_heard = time.monotonic()
        threading.Thread(target=self._read, daemon=True, name="engine-channel").start()

    def submit(self, *jobs) -> None:
        """Send jobs that join the batch together, or none: QueueFull."""
        with self.lock:
            if self.failure:
                for job in jobs:
                    job.emit(("error", self.failure))
                return
            waiting = max(0, len(self.jobs) - self.max_running)
            if len(self.jobs) + len(jobs) > self.max_running + self.max_waiting:
                raise QueueFull.of(waiting, len(jobs), self.max_waiting)
            ids = list(range(self.next_id, self.next_id + len(jobs)))
            self.next_id += len(jobs)
            for id, job in zip(ids, jobs):
                job.id = id
                self.jobs[id] = Answer(job, self.tokenizer.detokenizer)
            self._send(Submit(ids, [job_fields(job) for job in jobs]))

    def cancel(self, job) -> None:
        if getattr(job, "id", None) in self.jobs:
            self._send(Cancel(job.id))

    def counts(self):
        """(running, waiting) after rank 0's last step."""
        return self._counts

    def stalled_for(self) -> float:
        """Seconds since rank 0 last reported a step (it does at least every heartbeat)."""
        return time.monotonic() - self.last_heard

    def fail(self, reason: str) -> None:
        """The cluster is lost: end every job with `reason`; refuse new ones."""
        with self.lock:
            if self.failure:
                return
            self.failure = reason
            answers, self.jobs = list(self.jobs.values()), {}
        for answer in answers:
            answer.job.emit(("error", reason))
        log(f"mlx-moe: {reason}")

    def notify(self, reason: str) -> None:
        """The launcher found which rank failed first and why: the reason,
        unless rank 0 already reported a failure of its own (_rank0_failed
        then weighs both)."""
        self.notice = reason
        self.noticed.set()
        if not self.rank0_failed:
            self.fail(reason)

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:
            pass  # rank 0 is gone: _read ends the jobs

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                # Rank 0 is gone; the launcher's log says which rank failed first.
                self.noticed.wait(NOTICE_WAIT)
                self.fail(self.notice or "lost rank 0's engine (its process exited or its host is unreachable)")
                return
            self.last_heard = time.monotonic()
            if isinstance(message, Event):
                self._event(message.id, message.event)
            elif isinstance(message, Step):
                self._step(message)
            elif isinstance(message, Loads):
                self.expert_load = message.layers
            elif isinstance(message, Failed):
                self._rank0_failed(message)

    def _rank0_failed(self, message: Failed) -> None:
        """Rank 0 stopped the cluster. The launcher's word, if it comes
        within NOTICE_WAIT, names the rank that failed first: it wins when
        rank 0 only lost a peer, or when it names another rank (after a peer
        dies mid-collective, rank 0 can fail on the garbage it read). Else
        rank 0's own reason (its watchdog, its own error)."""
        self.rank0_failed = True
        self.noticed.wait(NOTICE_WAIT)
        notice = self.notice
        use_notice = notice and (message.elsewhere or not notice.startswith("rank 0 "))
        self.fail(notice if use_notice else message.reason)

    def _event(self, id: int, event: tuple) -> None:
        """One of job `id`'s events. Under the lock: a failure ends a job
        either before its last events or after, never between."""
        with self.lock:
            answer = self.jobs.get(id)
            if answer is None:  # ended (a stop string, a failure) or cancelled
                return
            if event[0] == "token":
                _, token, finish, logprobs, cached = event
                ended = answer.token(token, finish, logprobs, cached)
                if ended and not finish:  # a stop string: the engine still runs it
                    self._send(Cancel(id))
            else:
                ended = True
                answer.job.emit(event)
            if ended:
                del self.jobs[id]

    def _step(self, step: Step) -> None:
        for id, event in step.events:
            self._event(id, event)
        now = time.perf_counter()
        running = {}
        for id, tokens, seconds in step.active:
            answer = self.jobs.get(id)
            if answer is not None:
                running[id] = types.SimpleNamespace(job=answer.job, tokens=tokens, first=now - seconds)
        self.running, self._counts, self.kv_bytes = running, (step.running, step.waiting), step.kv_bytes
        self.on_step(step.running, step.waiting, step.decoded, sum(step.kv_bytes))


class Front:
    """The HTTP server and the channel's listening end, from before the
    ranks start until after they end."""

    def __init__(self, args, host: str, key: str, size: int):
        from .loading import Loading

        self.args = args
        self.listener = listen(host, key)
        self.address = address(self.listener)
        self.loading = Loading(size)
        self.client: Optional[EngineClient] = None
        self.server, self.thread, self.switch = self._serve_http()
        threading.Thread(target=self._accept, daemon=True, name="accept").start()

    def _serve_http(self):
        """uvicorn on the loading app; it listens before this returns, or this fails."""
        import uvicorn

        from .loading import Switch, loading_app

        args = self.args
        switch = Switch(loading_app(self.loading, args.model, api_key=args.api_key))
        server = uvicorn.Server(uvicorn.Config(switch, host=args.host, port=args.port, log_level="warning",
                                               lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True, name="http")
        thread.start()
        while not server.started and thread.is_alive():
            thread.join(0.05)
        if not server.started:
            raise OSError(f"cannot serve HTTP on {args.host}:{args.port} (is the port in use?)")
        log(f"mlx-moe: status page and /health on http://{args.host}:{args.port}/ while the ranks load")
        return server, thread, switch

    def _accept(self) -> None:
        from .app import create_app

        args = self.args
        try:
            conn = accept(self.listener)
            ready = conn.recv()
            tokenizer = load_tokenizer_of(args.model)
        except Exception as e:  # a rank that failed to load is reported by the launcher
            if not self.loading.failure:
                self.loading.failure = f"the front could not start serving: {type(e).__name__}: {e}"
            return
        client = EngineClient(conn, ready, tokenizer, args.max_concurrency, args.max_queue)
        if self.loading.failure:
            client.fail(self.loading.failure)
        hosts = ready.hosts
        app = create_app(client, args.model, ready.context_length, ready.plan_text, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes, cluster=lambda: hosts)
        self.client = client
        self.switch.switch(app, client.ready)
        client.ready.set()
        log(f"mlx-moe: serving {args.model} on http://{args.host}:{args.port}/v1 ({len(hosts)} ranks)")

    def failed(self, reason: str) -> None:
        """The launcher's word: a rank failed (named), every rank stops."""
        if self.client is not None:
            self.client.notify(reason)
        else:
            self.loading.failure = reason

    def progress(self, entries: List[dict]) -> None:
        self.loading.update(entries)

    def stop(self, reason: Optional[str]) -> None:
        """The ranks have ended: end every stream (with `reason`, or as a
        stop), let /health say why for a moment, then close HTTP once every
        response is written (uvicorn's graceful stop), within the bounds."""
        client = self.client
        if client is not None:
            client.fail(reason or "the server is stopping (a stop was requested)")
        deadline = time.monotonic() + FLUSH_WAIT
        while client is not None and client.open_responses > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if reason:
            time.sleep(FAILED_LINGER)
        self.server.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
        self.server.should_exit = True
        self.thread.join(self.server.config.timeout_graceful_shutdown + HTTP_STOP_SLACK)
        self.listener.close()
