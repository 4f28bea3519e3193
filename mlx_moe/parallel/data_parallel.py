"""Data-parallel attention under expert parallelism: each rank runs the
model on its own sequences (its home rows, with their KV caches), and only
the MoE layers see every rank's tokens.

A forward in this mode, on each rank:
- embeddings, attention (with this rank's own mlx-lm caches), norms and the
  head run on this rank's [B_r, L_r] tokens only; B_r and L_r may differ
  between ranks (one rank decodes while another prefills a chunk);
- each expert-parallel MoE layer (expert.py) does three visible steps:
  1. dispatch: one all_gather of every rank's tokens [B_r*L_r, D], padded
     to the largest rank's count (all_gather needs equal shapes), then the
     padding dropped, giving all T tokens [T, D] in rank order;
  2. experts: the block as in the replicated mode (router on every token,
     this rank's (token, expert) pairs), a partial sum over all T tokens;
  3. combine: one sum, each rank keeping its own rows: sum_scatter where
     the backend has it (found by a probe in `enable`), otherwise all_sum
     and a slice (ring: measured, it has no sum_scatter).
So a layer costs one all_gather and one combine, both under the message
bound (comm.py). Attention is never split across ranks in this mode (the
ranks' inputs differ); outside `home_tokens` the model runs replicated, as
before, so the mode is chosen per forward call.

Every rank must know every rank's token count for each forward, without a
collective: serving has the whole step plan on every rank, so the counts
come in as an argument. A rank with no tokens still joins every MoE
collective: mlx-lm's models reject a batch of zero rows (a reshape with
-1 fails), so it runs `idle_step`, one placeholder token that contributes
no rows.
"""

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from . import comm

_HOME = contextvars.ContextVar("mlx_moe_home_tokens", default=None)


@dataclass
class DataParallel:
    """What `enable` found for a model: its group and the combine to use."""

    group: mx.distributed.Group
    sum_scatter: bool


def enable(model, group: Optional[mx.distributed.Group] = None) -> DataParallel:
    """Let an expert-parallel `model` (from load_sharded) run forwards in
    the data-parallel mode. Every rank calls it at the same point: it
    probes, with one small collective, whether the backend can sum_scatter."""
    plan = getattr(model, "sharding_plan", None)
    if plan is None or plan.strategy != "expert":
        raise ValueError("data-parallel attention needs an expert-parallel model (load_sharded, strategy 'expert')")
    group = group or mx.distributed.init()
    model.data_parallel = DataParallel(group, comm.has_sum_scatter(group))
    return model.data_parallel


class Home:
    """One forward's token counts per rank, and the index arrays that move
    tokens between the padded gather and the packed [T, D] the experts see."""

    def __init__(self, dp: DataParallel, counts: Sequence[int]):
        self.group, self.sum_scatter = dp.group, dp.sum_scatter
        self.counts, self.rank = [int(c) for c in counts], dp.group.rank()
        n = self.group.size()
        if len(self.counts) != n or min(self.counts) < 0 or not sum(self.counts):
            raise ValueError(f"home token counts {self.counts}: need one count >= 0 per rank "
                             f"({n} ranks), not all 0")
        self.most = max(self.counts)
        self.start = sum(self.counts[:self.rank])
        self.combined = []  # each MoE layer's output, in order (see `join_all`)
        packed = np.concatenate([r * self.most + np.arange(c) for r, c in enumerate(self.counts)])
        uneven = len(set(self.counts)) > 1
        # Token t's row in the padded gather [N * most, D] (None: the same) ...
        self.packed = mx.array(packed.astype(np.int32)) if uneven else None
        # ... and, for sum_scatter, padded row i's token (T: a zero row).
        self.padded = None
        if self.sum_scatter and uneven:
            rows = np.full(n * self.most, len(packed), dtype=np.int32)
            rows[packed] = np.arange(len(packed))
            self.padded = mx.array(rows)

    def dispatch(self, x: mx.array) -> mx.array:
        """This rank's tokens x [..., D] -> every rank's [1, T, D] (3-d, as
        the blocks were written for [B, L, D]); step 1 of the layer."""
        own = self.counts[self.rank]
        rows = x.reshape(-1, x.shape[-1])
        if own and rows.shape[0] != own:
            raise ValueError(f"rank {self.rank} runs {rows.shape[0]} tokens ({tuple(x.shape)}) "
                             f"but home_tokens says {own} (counts {self.counts})")
        if own:
            send = mx.pad(rows, [(0, self.most - own), (0, 0)])
        else:  # an idle rank's placeholder: zeros, ordered after the layer before
            send = mx.depends(mx.zeros((self.most, rows.shape[1]), dtype=rows.dtype), rows)
        tokens = comm.all_gather(send, self.group)  # [N * most, D]
        if self.packed is not None:
            tokens = tokens[self.packed]
        return tokens[None]

    def combine(self, y: mx.array, x: mx.array) -> mx.array:
        """The experts' partial sums y [1, T, ...] -> this rank's rows, shaped
        like x's tokens; step 3 of the layer."""
        y = y.reshape(-1, *y.shape[2:])  # [T, ...]
        own = self.counts[self.rank]
        if self.sum_scatter:
            if self.padded is not None:  # back to the padded layout, a block per rank
                y = mx.concatenate([y, mx.zeros((1, *y.shape[1:]), dtype=y.dtype)])[self.padded]
            summed = comm.sum_scatter(y, self.group)  # [most, ...]
            mine = summed[:own]
        else:
            summed = comm.all_sum(y, self.group)  # [T, ...]
            mine = summed[self.start:self.start + own]
        shape = (*x.shape[:-1], *y.shape[1:])
        if not own:  # the placeholder's output: zeros that wait for the combine
            out = mx.depends(mx.zeros(shape, dtype=y.dtype), summed)
        else:
            out = mine.reshape(shape)
        self.combined.append(out)
        return out

    def join_all(self) -> None:
        """Queue every MoE layer's collectives of the forward just built. A
        caller may evaluate less than the whole output (mlx-lm's prompt
        chunks evaluate only the KV caches, which skips the last MoE layer),
        but the other ranks' forwards of the same slot run every layer."""
        mx.async_eval(self.combined)


def current() -> Optional[Home]:
    """The running forward's Home, None in the replicated mode."""
    return _HOME.get()


@contextlib.contextmanager
def home_tokens(model, counts: Sequence[int]):
    """Forwards inside run data-parallel: rank r passes its own tokens,
    counts[r] of them (B_r * L_r, padding included; 0: `idle_step`).
    Every rank enters it with the same counts."""
    dp = getattr(model, "data_parallel", None)
    if dp is None:
        raise ValueError("call mlx_moe.parallel.data_parallel.enable(model) first (on every rank)")
    token = _HOME.set(Home(dp, counts))
    try:
        yield
    finally:
        _HOME.reset(token)


def idle_step(model) -> None:
    """This rank's part of one forward in which it has no tokens (inside
    home_tokens with its count 0): one placeholder token, no cache, that
    joins every MoE collective and contributes no rows."""
    home = current()
    if home is None or home.counts[home.rank] != 0:
        raise ValueError("idle_step runs inside home_tokens, with this rank's count 0")
    mx.eval(model(mx.zeros((1, 1), dtype=mx.int32)))

