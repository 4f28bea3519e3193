"""The one small collective of each lockstep step: rank 0's plan and the
tokens rank 0 sampled, to every rank, inside the step's graph.

Step k's exchange is an all_sum (the others add zeros, so the sum is rank
0's words exactly) of HEADER_BYTES of rank 0's plan, as 32-bit words,
followed by the tokens rank 0 drew for every replicated sequence in step
k-1 (still lazy: they are not read on the host). It is issued on the
generation stream between step k-1's forward and step k's, so every rank
orders it with the model's collectives alike, and no synchronize is
needed. The plan it carries is applied one step later: by then the
collective has run with the forward that read its tokens, so reading the
plan costs no wait, and step k+1's graph is built while step k computes.
A plan longer than the header sends its rest in a second all_sum when it
is read (only steps where long prompts join)."""

import json
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from ...parallel import comm

# A plan with a few removals, or one short request, fits in the header.
HEADER_BYTES = 1024
HEADER_WORDS = HEADER_BYTES // 4
PING = {"op": "ping"}


class StepExchange:
    def __init__(self, group):
        self.group = group
        self.rank0 = group.rank() == 0
        self.pending: Optional[Tuple[mx.array, bytes]] = None  # the last exchange issued, and rank 0's plan

    def swap(self, plan: Optional[dict], tokens: Optional[mx.array]) -> Tuple[dict, Optional[mx.array]]:
        """Issue this step's exchange of rank 0's `plan` (the others pass
        None) and of `tokens` (the sequences' next inputs, or None); return
        the plan the previous call issued, and rank 0's tokens (lazy)."""
        data = json.dumps(plan, separators=(",", ":")).encode() if self.rank0 else b""
        header = np.zeros(HEADER_BYTES, np.uint8)
        if self.rank0:
            room = HEADER_BYTES - 4
            header[:4] = np.frombuffer(np.array([len(data)], "<u4").tobytes(), np.uint8)
            header[4:4 + min(len(data), room)] = np.frombuffer(data[:room], np.uint8)
        with mx.stream(generation_stream):
            words = mx.array(header.view("<u4"))
            if tokens is not None:
                words = mx.concatenate([words, tokens.astype(mx.uint32)])
            got = comm.broadcast(words, 0, self.group)
            mx.async_eval(got)  # on every rank, whatever the next plan keeps
        previous, self.pending = self.pending, (got, data)
        followed = got[HEADER_WORDS:] if tokens is not None else None
        return (self._read(*previous) if previous is not None else PING), followed

    def _read(self, got: mx.array, data: bytes) -> dict:
        header = np.array(got[:HEADER_WORDS]).view(np.uint8)
        size = int(header[:4].view("<u4")[0])
        room = HEADER_BYTES - 4
        text = bytes(header[4:4 + min(size, room)])
        if size > room:
            rest = np.frombuffer(data[room:], np.uint8) if self.rank0 else np.zeros(size - room, np.uint8)
            with mx.stream(generation_stream):
                text += bytes(np.array(comm.broadcast(mx.array(rest), 0, self.group)))
        return json.loads(text)
