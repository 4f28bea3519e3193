"""The channel between the front process and rank 0's engine, and every
message either side sends over it.

The front (`mlx-moe serve` itself: HTTP, templates, tokenizing, tool and
reasoning parsing, metrics, the status page) listens; rank 0 connects once
its engine runs. The connection is the standard library's
multiprocessing.connection over TCP: an HMAC handshake with a key made for
the run, then pickled messages. Ranks other than 0 never
talk to the front: rank 0 tells them what to run in each step's exchange.
"""

import os
import random
import socket
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Client, Connection, Listener
from typing import Callable, Dict, List, Optional

ADDRESS_ENV = "MLX_MOE_FRONT"  # host:port where the front listens, for rank 0
KEY_ENV = "MLX_MOE_CONTROL_TOKEN"  # the handshake's key


# A request, as the front builds it and the engine runs it.
@dataclass(eq=False)
class Job:
    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)  # end the answer, as end-of-sequence does
    logit_bias: Dict[int, float] = field(default_factory=dict)
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    # mlx-lm's penalties, over the last PENALTY_CONTEXT tokens (None / 0: off).
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: Optional[str] = None  # Lark text the answer must follow (structured.Grammars)
    # Log-probs of each token and of its `logprobs` most likely alternatives (None: none).
    logprobs: Optional[int] = None
    # Its events. On rank 0 (engine thread): ("token", token id, finish
    # reason or None, (token, logprob, [(token, logprob), ...]) or None,
    # prompt tokens cached) per step, or ("error", message). On the front,
    # for app.py (answers.Answer makes them of the tokens): ("text", str)
    # per piece (with logprobs: ("text", str, [(token, logprob, top, offset
    # of its text in the answer)]) for the tokens since the last piece), then
    # ("done", finish_reason, usage) or ("error", message).
    emit: Callable = print
    cancelled: bool = False  # the client went away (set by the HTTP side)

    def spec(self) -> dict:
        """What every rank needs to run it (stop strings stay on the front)."""
        seed = self.seed % 2**64 if self.seed is not None else random.randrange(2**31)
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=seed,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty,
                    logit_bias=[[k, v] for k, v in self.logit_bias.items()],
                    grammar=self.grammar, stop_token_ids=self.stop_token_ids, logprobs=self.logprobs)


class QueueFull(Exception):
    @classmethod
    def of(cls, waiting: int, bringing: int, most: int) -> "QueueFull":
        return cls(f"The server is busy: {waiting} requests are already waiting"
                   + (f" and this one brings {bringing}" if bringing > 1 else "")
                   + f" (at most {most} wait). Retry later.")


JOB_FIELDS = [f.name for f in fields(Job) if f.name not in ("emit", "cancelled", "stop")]


def job_fields(job: Job) -> dict:
    """What the engine needs of a job, to send (stop strings are the front's)."""
    return {name: getattr(job, name) for name in JOB_FIELDS}


# Front -> rank 0.
@dataclass
class Submit:
    """Jobs that join the batch together: each one's id and its Job fields
    (all but emit and cancelled)."""
    ids: List[int]
    jobs: List[dict]


@dataclass
class Cancel:
    """The client of job `id` went away."""
    id: int


# Rank 0 -> front.
@dataclass
class Ready:
    """The engine runs: what the front shows and checks requests against."""
    plan: object  # the model's ShardingPlan
    plan_text: str
    context_length: int
    heartbeat: float
    hosts: List[dict]  # per rank: host, pid, memory_bytes, memory_total_bytes


@dataclass
class Event:
    """One of job `id`'s events, as Job.emit gets them (engine.Job)."""
    id: int
    event: tuple


@dataclass
class Step:
    """After each engine step: its tokens (one message, whatever the batch),
    and the batch, for metrics and the status page."""
    events: List[tuple]  # (job id, event): the step's ("token", ...) events, in order
    running: int
    waiting: int
    decoded: int  # sequences that got a token this step
    kv_bytes: List[int]  # KV cache bytes per rank
    active: List[tuple] = field(default_factory=list)  # (job id, tokens so far, seconds since its first)


@dataclass
class Loads:
    """Expert loads per MoE block (ExpertLoad), sent before any answer that
    they count ends."""
    layers: list


@dataclass
class Failed:
    """The cluster stopped: why. `elsewhere`: another rank failed first, so
    the front takes the launcher's word on which, when it has one."""
    reason: str
    elsewhere: bool = False


def listen(host: str, key: str) -> Listener:
    """The front's end: a free port on `host`."""
    return Listener((host, 0), authkey=key.encode())


def address(listener: Listener) -> str:
    """What rank 0 is told (ADDRESS_ENV)."""
    host, port = listener.address
    return f"{host}:{port}"


def accept(listener: Listener) -> Connection:
    return no_delay(listener.accept())


def connect() -> Connection:
    """Rank 0's end, from the environment the front gave the ranks."""
    host, _, port = os.environ[ADDRESS_ENV].rpartition(":")
    return no_delay(Client((host, int(port)), authkey=os.environ[KEY_ENV].encode()))


def no_delay(conn: Connection) -> Connection:
    """Each message leaves at once. A step sends two small messages (a
    token, the step's counts), and with Nagle's algorithm the second waited
    for the first's delayed ACK: measured here, 1 message in 100 arrived
    38 ms late (0.4 ms with this)."""
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as s:  # a dup of the same socket
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn
