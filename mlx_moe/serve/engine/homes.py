"""Serving with data-parallel attention: each request lives on one home
rank, whose BatchGenerator alone holds its KV cache; the MoE layers see
every rank's tokens (mlx_moe.parallel.data_parallel).

The ranks' generators now hold different sequences, so they make different
forward calls in a step (a decode, the first token of prompts just read, a
prompt chunk: each only when there is one). Every MoE layer is a
collective, so the ranks must still run the same number of forwards.
`SlotModel` is the model as one rank's generator sees it: before each
forward it all_gathers its token count (a slot); once its generator's step
is done it keeps answering slots with 0, running a placeholder forward
(`idle_step`) while another rank still has one, until a slot in which every
rank says 0. That last slot's message also carries the rank's responses of
the step (request id, token, finish, cached prompt tokens) to rank 0,
which delivers every request's text. So a step costs the plan exchange,
one small all_gather per forward plus one, and the model's collectives.
"""

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ...parallel import comm
from ...parallel.data_parallel import current, home_tokens, idle_step

FINISH = (None, "stop", "length")  # finish_reason <-> its code in a slot message
ATTENTION = ("auto", "replicated", "data-parallel")
HEADER = 3  # a slot message: token count, responses, KV cache KiB; then the responses
ROW = 4  # a response: request id, token, finish code, prompt tokens the prefix cache held


@dataclass
class Response:
    """One generated token of a request, as rank 0 delivers it (the shape
    of mlx-lm's GenerationBatch.Response that the scheduler reads)."""
    uid: int
    token: int
    finish_reason: Optional[str]
    logprobs: Optional[mx.array] = None  # requests with log-probs live on rank 0
    cached: int = 0


class SlotModel:
    """The model, for one rank's BatchGenerator in data-parallel steps:
    every forward takes part in a slot (see the module's doc)."""

    def __init__(self, model, group, rows: int, tick=lambda: None):
        self.model, self.group, self.rows = model, group, rows
        self.tick = tick  # every rank met: the watchdog's progress
        self.data_parallel = False  # this step's mode, set by the engine

    def __getattr__(self, name):  # make_cache, layers, args: the model's
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        if not self.data_parallel:
            return self.model(inputs, cache=cache, **kwargs)
        counts, _ = self._slot(inputs.size)
        with home_tokens(self.model, counts):
            out = self.model(inputs, cache=cache, **kwargs)
            current().join_all()
            return out

    def finish_step(self, responses: List[tuple], kv_bytes: int):
        """After this rank's generator step (or none): join the others'
        remaining forwards; then (every rank's responses as `Response`s,
        every rank's KV cache bytes), from the last slot."""
        while True:
            counts, got = self._slot(0, responses, kv_bytes)
            if not any(counts):
                rows = np.concatenate([m[HEADER:HEADER + ROW * m[1]].reshape(-1, ROW) for m in got])
                return ([Response(int(r), int(t), FINISH[int(f)], cached=int(c)) for r, t, f, c in rows],
                        [int(m[2]) * 1024 for m in got])
            with home_tokens(self.model, counts):
                idle_step(self.model)

    def _slot(self, count: int, responses: Optional[List[tuple]] = None, kv_bytes: int = 0):
        msg = np.zeros(HEADER + ROW * self.rows, np.int32)
        msg[0] = count
        if responses is not None:
            msg[1], msg[2] = len(responses), kv_bytes // 1024
            if responses:
                msg[HEADER:HEADER + ROW * len(responses)] = np.array(responses, np.int32).reshape(-1)
        got = np.array(comm.all_gather(mx.array(msg)[None], self.group))
        self.tick()
        return got[:, 0].tolist(), got

    @contextlib.contextmanager
    def step(self, data_parallel: bool):
        self.data_parallel = data_parallel
        try:
            yield
        finally:
            self.data_parallel = False


class Members:
    """This rank's sequences: the request ids of the plan (rank 0 numbers
    requests; generators number their own sequences, alike only when every
    rank holds every sequence) and the generator's ids."""

    def __init__(self):
        self.uid_of: Dict[int, int] = {}
        self.rid_of: Dict[int, int] = {}
        self.cached: Dict[int, int] = {}  # prompt tokens the prefix cache held
        self.replicated: set = set()  # request ids every rank holds

    def add(self, rids: List[int], uids: List[int], cached: List[int], replicated: List[bool]) -> None:
        for rid, uid, n, everywhere in zip(rids, uids, cached, replicated):
            self.uid_of[rid], self.rid_of[uid], self.cached[rid] = uid, rid, n
            if everywhere:
                self.replicated.add(rid)

    def release(self, rids: List[int]) -> List[int]:
        """The generator ids of those of `rids` this rank holds, forgotten."""
        uids = [self.uid_of[r] for r in rids if r in self.uid_of]
        for uid in uids:
            self.ended(uid)
        return uids

    def ended(self, uid: int) -> int:
        """Forget a sequence the generator ended: its request id."""
        rid = self.rid_of.pop(uid)
        del self.uid_of[rid]
        self.cached.pop(rid, None)
        self.replicated.discard(rid)
        return rid


class Placement:
    """Rank 0: numbers the requests of each plan and says where they live.
    `attention`: "replicated" (every rank holds every sequence), "data-parallel"
    (each on one home rank) or "auto": replicated while one request runs
    alone, data-parallel as soon as two share the batch. Moving from
    replicated to data-parallel is free: the other ranks drop their copy of
    the running sequence (`rehome`); back to replicated only once the batch
    is empty, since that would need the home's KV cache on every rank."""

    def __init__(self, size: int, attention: str, room: int, history: int = 256):
        self.size, self.attention, self.room = size, attention, room
        self.homes: Dict[int, int] = {}  # running request id -> home rank (-1: every rank)
        self.lengths: Dict[int, int] = {}  # running request id -> tokens it holds (about)
        self.tokens: Dict[int, List[int]] = {}  # running request id -> prompt and answer so far
        self.history: deque = deque(maxlen=history)  # (tokens, home) of finished requests
        self.next_id = 0

    def place(self, plan: dict) -> None:
        """Give the plan's new requests ids and homes, and the plan its mode."""
        if plan["op"] != "step":
            return
        for rid in plan["remove"]:
            self._end(rid)
        adds = plan["add"]
        # A request whose conversation a rank holds goes there, even alone.
        near = [self._affinity(spec["prompt"]) for spec in adds] if self.attention != "replicated" else []
        plan["dp"] = self.attention == "data-parallel" or (self.attention == "auto" and (
            len(self.homes) + len(adds) >= 2 or any(h >= 0 for h in self.homes.values())
            or any(h is not None for h in near)))
        if plan["dp"]:
            moved = [rid for rid, home in self.homes.items() if home < 0]
            for rid in moved:
                self.homes[rid] = self._choose(None, need_rank0=False)
            plan["rehome"] = [[rid, self.homes[rid]] for rid in moved]
        for i, spec in enumerate(adds):
            spec["id"], self.next_id = self.next_id, self.next_id + 1
            # A request with log-probs lives on rank 0, which reads them.
            home = self._choose(near[i], spec.get("logprobs") is not None) if plan["dp"] else -1
            spec["home"] = self.homes[spec["id"]] = home
            self.lengths[spec["id"]], self.tokens[spec["id"]] = len(spec["prompt"]), list(spec["prompt"])

    def delivered(self, responses) -> None:
        """Tokens generated this step; requests that ended leave."""
        for r in responses:
            if r.uid in self.tokens:
                self.tokens[r.uid].append(r.token)
                self.lengths[r.uid] += 1
                if r.finish_reason:
                    self._end(r.uid)

    def _end(self, rid: int) -> None:
        home = self.homes.pop(rid, None)
        tokens = self.tokens.pop(rid, None)
        self.lengths.pop(rid, None)
        if home is not None and home >= 0 and tokens:
            self.history.append((np.array(tokens), home))

    def _choose(self, affinity: Optional[int], need_rank0: bool) -> int:
        if need_rank0:
            return 0
        loads, held = [0] * self.size, [0] * self.size
        for rid, home in self.homes.items():
            if home >= 0:
                loads[home] += 1
                held[home] += self.lengths[rid]
        return choose_home(loads, held, affinity, self.room)

    def _affinity(self, prompt: List[int]) -> Optional[int]:
        """The home of the finished request that shares the longest start
        with `prompt` (a chat's earlier turn), if it shares at least half."""
        best, home = 0, None
        p = np.array(prompt)
        for tokens, h in self.history:
            n = min(len(tokens), len(p))
            same = int(np.argmin(np.append(tokens[:n] == p[:n], False)))
            if same > best:
                best, home = same, h
        return home if best * 2 >= len(prompt) else None


def choose_home(loads: List[int], tokens: List[int], affinity: Optional[int], room: int) -> int:
    """Rank 0's choice of a new request's home: the rank that served the
    conversation before (its prefix cache holds it) if it has fewer than
    `room` requests, else the one with the fewest requests, then the fewest
    tokens in its KV caches."""
    if affinity is not None and loads[affinity] < room:
        return affinity
    return min(range(len(loads)), key=lambda r: (loads[r], tokens[r], r))


def attention_mode(asked: str, model) -> str:
    """The mode `serve` runs: data-parallel needs an expert-parallel model on
    2+ ranks; auto falls back to replicated without one."""
    plan = getattr(model, "sharding_plan", None)
    if asked == "replicated" or (plan is not None and plan.strategy == "expert" and plan.size > 1):
        return asked
    if asked == "data-parallel":
        raise ValueError(f"--attention data-parallel needs expert parallel on 2 or more ranks; this model "
                         f"runs {plan.strategy if plan else 'unsharded'}: use --attention replicated")
    return "replicated"
