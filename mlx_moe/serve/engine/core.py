"""The lockstep engine: every rank runs the same batch of generations, step
by step; rank 0 decides which requests join and leave and tells the others.

A step, on every rank: one exchange (exchange.py: one all_sum of 1 KiB
plus 4 bytes per running sequence; a second when new prompts do not fit)
that carries rank 0's plan, applied a step later, then the same
inserts and removals on mlx-lm's BatchGenerator, then one `next()`: a
decode step of every running sequence (the expert-parallel model still
makes one combine per MoE layer, for the whole batch) plus, while new
prompts are being read, one chunk of at most `prefill_step_size` of their
tokens (and that chunk's collectives), so a long prompt does not stall the
running streams. Rank 0 samples every replicated sequence (with the
request's own seeded key, its logits processors and grammar) and the
others feed the model rank 0's tokens, which travel in the step's exchange
(exchange.py: inside the graph, so step t+1 is built while step t
computes), so ranks whose floats differ (mixed Macs) stay in step.
End-of-sequence and max_tokens then end a sequence inside the generator
identically everywhere, and so do a request's stop token ids (they are in
the plan). Rank 0 sends each token id and its log-probs to the front,
which detokenizes and matches stop strings (a stop string reached removes
the sequence in a later plan, as a cancel does). Under data-parallel
attention a request's home rank samples it.
"""

import dataclasses
import faulthandler
import os
import threading
import time
from collections import deque
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences, generation_stream
from mlx_lm.sample_utils import make_logits_processors

from ...cluster.failures import lost_peer, rank_failed
from ...loader import log
from ...parallel import comm, data_parallel
from ...parallel.expert import expert_loads
from ...patches import settled_clear_cache
from ...sampling import request_sampler
from ..channel import Job
from .homes import FINISH, Members, Placement, SlotModel
from .prefix_cache import PrefixCache
from .progress import Progress
from .exchange import StepExchange
from .scheduler import Scheduler
from ..structured import Grammars


PENALTY_CONTEXT = 20  # tokens the penalties look back over (mlx-lm's default)
LOAD_REFRESH = 1.0  # seconds between expert-load snapshots while others run
PREFILL_BATCH = 8  # prompts read together, in one padded chunk (mlx-lm's default)


def bound_prefill(generator: BatchGenerator, budget: int) -> None:
    """Keep a step's prompt tokens within `budget`, shared by the prompts
    being read. mlx-lm reads up to prefill_step_size tokens of EVERY prompt
    in its prompt batch (8) per step: up to 8x the budget, and the running
    streams wait for all of it (measured: an 11 s stall for 8 short prompts
    here, tools/step_profile.py). Reads the generator's private counts
    (mlx-lm is pinned below 0.33); every rank computes the same."""
    g = generator
    joining = min(g.prefill_batch_size - len(g._prompt_batch),
                  g.completion_batch_size - len(g._generation_batch), len(g._unprocessed_sequences))
    g.prefill_step_size = max(1, budget // max(1, len(g._prompt_batch) + max(0, joining)))


class Engine:
    """Runs on every rank. Rank 0 takes jobs from `submit` (at most
    `max_queue` waiting, else QueueFull) and runs up to `max_concurrency` at
    once; when idle it sends a ping plan every `heartbeat` seconds so every
    rank keeps seeing the cluster alive. A watchdog stops the process when
    the cluster makes no progress for `watchdog` seconds (plus a margin for
    slow steps, progress.py) while this rank is waiting on it (a stalled or
    lost rank), instead of spinning forever."""

    def __init__(self, model, tokenizer, group, heartbeat: float = 5.0, watchdog: float = 60.0,
                 max_concurrency: int = 16, max_queue: int = 64, prefill_step_size: int = 512,
                 prompt_cache_bytes: int = 0, attention: str = "replicated"):
        self.model, self.tokenizer, self.group = model, tokenizer, group
        self.rank, self.attention = group.rank(), attention
        self.exchange = StepExchange(group)
        self._dp = False  # whether the last step ran data-parallel (its sequences are not replicated)
        if attention != "replicated":
            data_parallel.enable(model, group)
        # The model as the generator calls it: in data-parallel steps each forward joins a slot.
        self.progress = Progress(watchdog)
        self.slots = SlotModel(model, group, max_concurrency, tick=self.progress.tick)
        self.members = Members()  # this rank's sequences
        self.placement = Placement(group.size(), attention, room=max_concurrency)  # rank 0's
        self.kv_bytes = [0] * group.size()  # KV cache bytes per rank, after the last step (rank 0)
        self.max_concurrency, self.prefill_step_size = max_concurrency, prefill_step_size
        self.scheduler = Scheduler(max_concurrency, max_queue)
        self.prefix = PrefixCache(prompt_cache_bytes)
        self.grammars = Grammars(tokenizer)
        self.ready = threading.Event()
        self.heartbeat, self.watchdog = heartbeat, watchdog
        self.failure: Optional[str] = None  # set once the cluster is lost
        self.failed_elsewhere = False  # whether another rank failed first (see fail)
        self.expert_load = []  # ExpertLoad per MoE block, a recent snapshot (rank 0, for /metrics)
        self._load_time = 0.0
        self.on_failure = lambda reason: os._exit(3)
        # After each step (rank 0): (running, waiting, sequences decoded, KV cache bytes).
        self.on_step = lambda running, waiting, decoded, kv_bytes: None
        self._done = False

    def submit(self, *jobs: Job) -> None:
        """Queue jobs that join the batch together (Scheduler.submit); once
        the cluster is lost, each gets the failure as its error."""
        self.scheduler.submit(*jobs)

    def cancel(self, job: Job) -> None:
        """Its client went away: it leaves the batch at the next step."""
        self.scheduler.cancel(job)

    def shutdown(self) -> None:
        self.scheduler.stop()

    def fail(self, reason: str, error: Optional[Exception] = None, elsewhere: bool = False) -> None:
        """The cluster is lost: end every job, running or waiting, with
        `reason`, refuse new ones, and let `on_failure` stop this rank.
        `error`: this rank's own failure, reported for the launcher to pass
        on. `elsewhere`: another rank failed first, and the launcher's log
        says which (`failed_elsewhere`, for the front)."""
        # One step under the scheduler's lock: a job submitted meanwhile is
        # either drained here or refused by the closed scheduler, never left queued.
        with self.scheduler.cond:
            if self.failure:
                return
            self.failure, self.failed_elsewhere = reason, elsewhere
            jobs = self.scheduler.close(reason)
        for job in jobs:
            job.emit(("error", reason))
        # Logged after the clients are told: stderr is a pipe that may block.
        if error is not None:
            rank_failed(self.rank, error)
        else:
            log(f"[rank {self.rank}] {reason}")
        self.on_failure(reason)

    def _watch(self) -> None:
        while self.failure is None and not self._done:
            # Last resort if a native call holds the GIL through a stall, so
            # this thread cannot run: dump every thread's stack and exit.
            limit = self.progress.limit()
            faulthandler.dump_traceback_later(limit * 2 + 10, exit=True)
            time.sleep(min(1.0, self.watchdog / 4))
            stalled = self.progress.stalled_for()
            if stalled > limit:
                self.fail(f"no progress from the cluster for {stalled:.0f} s: "
                          "a rank is stalled or unreachable; stopping")
        faulthandler.cancel_dump_traceback_later()

    def run(self) -> None:
        """The loop every rank runs until rank 0 says stop."""
        with settled_clear_cache(comm.settle):  # mlx-lm's generator calls mx.clear_cache
            self._loop()

    def _loop(self) -> None:
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        generator = self.generator()
        live = set()  # the generator's sequences: the same ids on every rank
        self._snapshot_load()
        self.ready.set()
        try:
            while self.step(generator, live):
                pass
        except Exception as e:
            if lost_peer(e):
                self.fail(f"lost the cluster ({e})", elsewhere=True)
            else:
                # It may have failed on this rank only (out of memory, a
                # Metal error), the others waiting inside this step's
                # collectives: no rank can go on in step, so the cluster
                # stops, saying which rank failed and why.
                self.fail(f"rank {self.rank} failed: {type(e).__name__}: {e}", error=e)

    def generator(self) -> BatchGenerator:
        """The batch this rank runs; `step` drives it."""
        return BatchGenerator(
            self.slots, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=self.max_concurrency,
            prefill_batch_size=min(PREFILL_BATCH, self.max_concurrency),
            prefill_step_size=self.prefill_step_size)

    def step(self, generator: BatchGenerator, live: set) -> bool:
        """One lockstep step: issue this step's exchange (rank 0's next plan
        and the tokens it drew), apply the plan the last one carried, run
        the batch. False once rank 0 says stop."""
        plan = None
        if self.rank == 0:
            self.progress.waiting = False  # it may wait for a request now, not for the cluster
            plan = self.scheduler.plan(self.heartbeat)
            self.placement.place(plan)
        self.progress.tick()
        self.progress.waiting = True
        # Rank 0 drew the replicated sequences' next tokens; every rank feeds
        # the model those (ranks on different Macs would draw apart at a near tie).
        batch = generator._generation_batch  # mlx-lm is pinned below 0.33
        follow = self.group.size() > 1 and not self._dp and len(batch) > 0
        plan, followed = self.exchange.swap(plan, batch._next_tokens if follow else None)
        if follow:
            batch._next_tokens = followed
        self.progress.tick()
        if plan["op"] == "shutdown":
            self._done = True
            return False
        if plan["op"] == "step":
            self._apply(plan, generator, live)
        dp = self._dp = plan.get("dp", False)
        if live:
            bound_prefill(generator, self.prefill_step_size)
        with self.slots.step(dp):
            responses = generator.next()[1] if live else []
        self.progress.tick()
        rids = [self.members.rid_of[r.uid] for r in responses]
        for r, rid in zip(responses, rids):
            if r.finish_reason:
                live.discard(r.uid)
                self.prefix.keep(r.all_tokens, r.prompt_cache, rid in self.members.replicated)
                self.members.ended(r.uid)
        responses = [dataclasses.replace(r, uid=rid) for r, rid in zip(responses, rids)]
        kv = [generator.prompt_cache_nbytes] * self.group.size()
        if dp:
            rows = [(r.uid, r.token, FINISH.index(r.finish_reason), self.members.cached.get(r.uid, 0))
                    for r in responses]
            with mx.stream(generation_stream):
                others, kv = self.slots.finish_step(rows, generator.prompt_cache_nbytes)
            if self.rank == 0:
                # Rank 0's own keep their log-probs; the others' come from their homes.
                responses += [o for o in others if self.placement.homes.get(o.uid, 0) != 0]
        self.progress.tick()
        if self.rank == 0:
            for r in responses:
                active = self.scheduler.running.get(r.uid)
                if active is not None and getattr(r, "cached", 0):
                    active.cached = r.cached
            self.placement.delivered(responses)
            self.scheduler.deliver(responses, self._snapshot_load)
            self.kv_bytes = kv
            self.on_step(*self.scheduler.counts(), len(responses), sum(kv))
        return True

    def _apply(self, plan: dict, generator: BatchGenerator, live: set) -> None:
        """The plan's removals, then its inserts, in its order: where every
        rank holds every sequence, the generators number them alike."""
        for rid, home in plan.get("rehome", []):
            self.members.replicated.discard(rid)
        moved = [rid for rid, home in plan.get("rehome", []) if home != self.rank]
        leaving = sorted(r for r in plan["remove"] if r in self.members.uid_of)  # one order everywhere
        shared = [r in self.members.replicated for r in leaving]
        gone, dropped = self.members.release(leaving), self.members.release(moved)
        removed = generator.remove(gone + dropped, return_prompt_caches=self.prefix.enabled)
        for uid, everywhere in zip(gone, shared):
            if uid in removed:
                self.prefix.keep(removed[uid][1], removed[uid][0], everywhere)
        live.difference_update(gone + dropped)
        add = plan["add"]
        mine = [r for r in add if r.get("home", -1) in (-1, self.rank)]
        cached = {}
        if mine:
            reused = [self.prefix.take(r["prompt"], r.get("home", -1) < 0) for r in mine]
            # A replicated request is sampled on rank 0 only, the others follow
            # it; under auto attention it may move to another rank and be
            # sampled there, so every rank keeps its key and processors in step.
            samples = [self.rank == 0 or r.get("home", -1) >= 0 or self.attention == "auto" for r in mine]
            processors = [self.processors(r) if s else [] for r, s in zip(mine, samples)]
            raw = [self.capture_raw(r, p) for r, p in zip(mine, processors)]
            eos = [[t] for t in self.tokenizer.eos_token_ids]
            uids = generator.insert(
                [rest for _, rest, _ in reused], max_tokens=[r["max_tokens"] for r in mine],
                caches=[cache for cache, _, _ in reused],
                all_tokens=[r["prompt"][:n] for r, (_, _, n) in zip(mine, reused)],
                samplers=[request_sampler(r) if s else None for r, s in zip(mine, samples)],
                logits_processors=processors,
                stop_sequences=[StopSequences(eos + [[t] for t in r["stop_token_ids"]]) for r in mine])
            live.update(uids)
            cached = {r["id"]: n for r, (_, _, n) in zip(mine, reused)}
            self.members.add([r["id"] for r in mine], uids, list(cached.values()),
                             [r.get("home", -1) < 0 for r in mine])
        if self.rank == 0 and add:
            self.scheduler.joined([r["id"] for r in add], [cached.get(r["id"], 0) for r in add])
            for r, capture in zip(mine, raw if mine else []):
                self.scheduler.running[r["id"]].raw = capture

    def processors(self, spec: dict) -> list:
        """One request's logits processors (mlx-lm's, and its grammar's), from its Job.spec."""
        return make_logits_processors(
            logit_bias=dict(spec["logit_bias"]), repetition_penalty=spec["repetition_penalty"],
            repetition_context_size=PENALTY_CONTEXT, presence_penalty=spec["presence_penalty"] or None,
            presence_context_size=PENALTY_CONTEXT, frequency_penalty=spec["frequency_penalty"] or None,
            frequency_context_size=PENALTY_CONTEXT,
        ) + ([self.grammars.processor(spec["grammar"])] if spec.get("grammar") else [])

    def capture_raw(self, spec: dict, processors: list) -> Optional[deque]:
        """Rank 0, for a request with logprobs whose processors change the
        logits (logit_bias, penalties, a grammar): a deque that gets the
        model's own log-probs of each step, as OpenAI and vLLM report them
        (the generator's are those after the processors). None otherwise:
        the generator's are the model's."""
        if self.rank != 0 or spec["logprobs"] is None or not processors:
            return None
        raw = deque()

        def keep(tokens, logits):
            raw.append(logits[0] - mx.logsumexp(logits[0], keepdims=True))
            return logits
        processors.insert(0, keep)
        return raw

    def _snapshot_load(self) -> None:
        # On the engine thread, because counting evaluates MLX arrays; before
        # an answer's end is sent, so a scrape after it includes its tokens
        # (the wait is the step mlx-lm computed ahead, at most); while others
        # run or wait, at most every LOAD_REFRESH s.
        now = time.monotonic()
        busy = any(self.scheduler.counts())
        if self.rank == 0 and (not busy or now - self._load_time >= LOAD_REFRESH):
            self.expert_load, self._load_time = expert_loads(self.model), now
