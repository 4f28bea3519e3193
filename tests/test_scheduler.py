"""When the cluster is lost: every job of rank 0's scheduler gets exactly
one terminal event ("done" or "error"), however its submit and the failure
interleave; the error names the rank that failed first. No model: stand-ins
hold what Engine.submit, Engine.fail and the front's client use."""

import sys
import threading
import types
from collections import deque

import mlx.core as mx
import pytest

from mlx_moe.serve.channel import Job
from mlx_moe.serve.engine.core import Engine
from mlx_moe.serve.engine.scheduler import Scheduler
from mlx_moe.serve.front.answers import Answer

REASON = "lost the cluster"


def _engine(scheduler=None):
    return types.SimpleNamespace(scheduler=scheduler or Scheduler(4, 10**6),
                                 failure=None, rank=0, on_failure=lambda reason: None)


def _job(events: list) -> Job:
    return Job(prompt=[1, 2], max_tokens=4, emit=events.append)


def _terminal(events: list) -> list:
    return [e for e in events if e[0] in ("done", "error")]


def test_a_job_submitted_after_close_gets_the_error():
    scheduler = Scheduler(4, 8)
    waiting = [[], []]
    scheduler.submit(*(_job(e) for e in waiting))
    assert len(scheduler.close(REASON)) == 2 and not scheduler.waiting
    late = [[], []]
    scheduler.submit(*(_job(e) for e in late))
    assert late == [[("error", REASON)]] * 2 and not scheduler.waiting
    assert waiting == [[], []]  # the caller of close ends them


def test_a_failure_between_a_submit_and_its_queueing_still_ends_the_job():
    """The interleaving that lost a job: the failure comes while a submit is
    on its way to the queue (here: just before the scheduler takes it)."""
    engine = _engine()

    class FailFirst(Scheduler):
        def submit(self, *jobs):
            failing = threading.Thread(target=Engine.fail, args=(engine, REASON))
            failing.start()
            failing.join(1)  # done, or blocked on this scheduler's lock
            super().submit(*jobs)

    engine.scheduler = FailFirst(4, 8)
    events = []
    Engine.submit(engine, _job(events))
    assert events == [("error", REASON)] and not engine.scheduler.waiting


def test_every_job_gets_one_terminal_event_when_submits_race_a_failure():
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes
    try:
        for _ in range(20):
            engine, logs, go = _engine(), [], threading.Barrier(9)

            def submitting():
                go.wait()
                for _ in range(200):
                    events = []
                    logs.append(events)
                    Engine.submit(engine, _job(events))

            threads = [threading.Thread(target=submitting) for _ in range(8)]
            for t in threads:
                t.start()
            go.wait()
            while len(logs) < 400 and all(t.is_alive() for t in threads):  # fail mid-way through the submits
                pass
            Engine.fail(engine, REASON)
            for t in threads:
                t.join()
            assert [len(_terminal(events)) for events in logs] == [1] * len(logs)
            assert not engine.scheduler.waiting
    finally:
        sys.setswitchinterval(switch)


def test_an_answer_that_ends_as_the_cluster_fails_gets_no_done():
    """The failure (another thread) drains a running job while the step
    that finishes it is delivering: its error was its end."""
    engine, events = _engine(), []

    class FailingRaw(deque):  # the log-probs are read between the two looks at the running jobs
        def popleft(self):
            Engine.fail(engine, REASON)
            return mx.zeros(8)

    scheduler = engine.scheduler
    job = _job(events)
    job.logprobs = 1
    scheduler.submit(job)
    scheduler.plan(0)
    scheduler.joined([7], [0])
    scheduler.running[7].raw = FailingRaw()
    finished = types.SimpleNamespace(uid=7, token=3, logprobs=None, finish_reason="length")
    scheduler.deliver([finished], lambda: None)
    assert events == [("error", REASON)]


def test_a_rank_that_exited_first_is_named_over_one_that_then_failed():
    """Rank 1 is killed; rank 0 then fails on the garbage a broken collective
    left it, and prints its own failure before rank 1's exit has had its
    wait for a reason: the launcher still names rank 1."""
    from mlx_moe.cluster.failures import FirstFailure

    seen = []
    watch = FirstFailure(seen.append, hosts=["mac1", "mac2"])
    watch.feed("[WARN] Node with rank 1 was killed")
    watch.feed("mlx-moe: rank 0 failed: ValueError: home token counts [4, -1083478366]")
    assert watch.settle() == "rank 1 (host mac2) was killed" and seen == [watch.failure]
    alone = FirstFailure(seen.append)
    alone.feed("mlx-moe: rank 0 failed: MemoryError: out of memory")
    assert alone.failure == "rank 0 failed: MemoryError: out of memory"  # no earlier exit: at once


def _front_client():
    from mlx_moe.serve.front.process import EngineClient

    client = EngineClient.__new__(EngineClient)  # no channel: only the failure logic
    client.lock, client.jobs, client.failure = threading.Lock(), {}, None
    client.notice, client.noticed, client.rank0_failed = None, threading.Event(), False
    return client


@pytest.mark.parametrize("notice, elsewhere, want", [
    ("rank 1 (host mac2) was killed by SIGKILL", False, "rank 1 (host mac2) was killed by SIGKILL"),
    ("rank 0 (host mac1) exited with code 3", False, "no progress from the cluster for 9 s"),
    ("rank 1 (host mac2) was killed by SIGKILL", True, "rank 1 (host mac2) was killed by SIGKILL"),
    (None, False, "no progress from the cluster for 9 s"),
], ids=["another rank died first", "rank 0's own exit", "a lost peer", "no word from the launcher"])
def test_the_front_names_the_rank_that_failed_first(monkeypatch, notice, elsewhere, want):
    from mlx_moe.serve import channel
    from mlx_moe.serve.front import process

    monkeypatch.setattr(process, "NOTICE_WAIT", 0.5)
    client, events = _front_client(), []
    client.jobs[0] = Answer(_job(events), None)
    reason = "lost the cluster ([ring] connection to a peer was lost)" if elsewhere else \
        "no progress from the cluster for 9 s"
    failing = threading.Thread(target=client._rank0_failed, args=(channel.Failed(reason, elsewhere),))
    failing.start()
    if notice:
        client.notify(notice)  # after rank 0's report: it does not decide by itself
    failing.join(5)
    assert events == [("error", want)]
