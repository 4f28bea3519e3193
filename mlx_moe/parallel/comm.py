"""Collectives used by mlx-moe: counted, and kept under a message-size bound.

Every collective goes through here so tests and benchmarks can count them
(`comm_stats`) and so the buffer guard lives in one place: an array larger
than the bound travels as several messages of at most that many bytes.

Why a bound: JACCL (Thunderbolt 5 RDMA) streams collectives through fixed
buffers of at most 512 KiB (4 KiB on older macOS), and a prefill-sized
message overran them in exo (a SIGSEGV in all_gather). The default of
512 KiB keeps a message within one such buffer; on the ring backend (TCP)
it costs nothing measurable since a decode step's messages are a few KiB
and prefill pieces of 512 KiB already amortize the per-message latency.
Set it with `load_sharded(max_collective_bytes=...)` or the environment
variable MLX_MOE_MAX_COLLECTIVE_BYTES.
"""

import math
import os

import mlx.core as mx
from mlx_lm.generate import generation_stream

DEFAULT_MAX_COLLECTIVE_BYTES = 512 * 1024

# Above this many bytes a collective is evaluated where it is issued, so a
# long prompt becomes a series of bounded graphs rather than one graph of
# compute and collectives (which trips the ~5 s Metal watchdog on macOS).
EVAL_ABOVE_BYTES = 1024 * 1024

_stats = {"collectives": 0, "messages": 0, "max_message_bytes": 0, "total_bytes": 0}
_max_bytes = int(os.environ.get("MLX_MOE_MAX_COLLECTIVE_BYTES", DEFAULT_MAX_COLLECTIVE_BYTES))


def set_max_message_bytes(n: int) -> None:
    global _max_bytes
    if n < 1024:
        raise ValueError(f"max collective bytes must be at least 1024, got {n}")
    _max_bytes = int(n)


def max_message_bytes() -> int:
    return _max_bytes


def comm_stats() -> dict:
    """Counters since the last reset: collectives issued, messages sent
    (a guarded collective may split into several), largest message, total bytes."""
    return dict(_stats)


def reset_comm_stats() -> None:
    for k in _stats:
        _stats[k] = 0


def _pieces(x: mx.array):
    """x flattened into row-major pieces of at most the bound: along the
    token axis first, and within a row only if one row is over the bound."""
    flat = x.reshape(-1)
    per_piece = max(1, _max_bytes // x.itemsize)
    n = math.ceil(flat.size / per_piece) if flat.size else 1
    if n == 1:
        return _counted([flat])
    return _counted([flat[i * per_piece : (i + 1) * per_piece] for i in range(n)])


def _counted(pieces):
    """The messages of one collective, counted."""
    _stats["collectives"] += 1
    for p in pieces:
        _stats["messages"] += 1
        _stats["total_bytes"] += p.nbytes
        _stats["max_message_bytes"] = max(_stats["max_message_bytes"], p.nbytes)
    return pieces


def _join(pieces, x: mx.array) -> mx.array:
    out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)
    return _evaluated_if_large(out.reshape(x.shape))


def _evaluated_if_large(out: mx.array) -> mx.array:
    if out.nbytes > EVAL_ABOVE_BYTES:
        mx.eval(out)
    return out


def all_sum(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """Sum `x` over the group: the one combine of an expert-parallel layer.

    Counted when the graph is built, which is when the order of collectives
    is fixed: every rank builds the same graph, so they pair up.
    """
    return _join([mx.distributed.all_sum(p, group=group) for p in _pieces(x)], x)


def all_gather(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """Every rank's `x` concatenated on axis 0 in rank order, each rank's
    part sent in pieces of at most the bound."""
    n = group.size()
    parts = [mx.distributed.all_gather(p, group=group).reshape(n, -1) for p in _pieces(x)]
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    return _evaluated_if_large(out.reshape(n * x.shape[0], *x.shape[1:]))


def sum_scatter(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """Sum `x` over the group and keep this rank's block of it: x's rows are
    N equal blocks in rank order, and rank r gets the sum of block r (a
    reduce-scatter: each rank receives 1/N of what all_sum would give it).
    Only where `has_sum_scatter` says the backend has it (JACCL, NCCL; not
    ring). Each message holds at most the bound: every rank's block is cut
    into the same columns, and a message carries one column of all N."""
    n = group.size()
    blocks = x.reshape(n, -1)  # [N, elements per rank]
    per_piece = max(1, _max_bytes // (n * x.itemsize))
    cols = [(i, min(i + per_piece, blocks.shape[1])) for i in range(0, blocks.shape[1], per_piece)]
    pieces = _counted([blocks[:, a:b].reshape(-1) for a, b in cols] if len(cols) > 1 else [blocks.reshape(-1)])
    out = [mx.distributed.sum_scatter(p, group=group) for p in pieces]
    out = out[0] if len(out) == 1 else mx.concatenate(out)
    return _evaluated_if_large(out.reshape(x.shape[0] // n, *x.shape[1:]))


def has_sum_scatter(group: mx.distributed.Group) -> bool:
    """Whether the group's backend sums and scatters in one collective: one
    small sum_scatter is tried (and checked). Every rank must call it at
    the same point, since on a backend that has it, it is a collective.
    Measured with mlx 0.32: ring raises "[ring] sum_scatter not supported"
    (locally, without sending, so every rank sees it at once)."""
    n = group.size()
    try:
        got = mx.distributed.sum_scatter(mx.arange(2 * n, dtype=mx.float32), group=group)
        return got.tolist() == [float(n * (2 * group.rank() + i)) for i in range(2)]
    except RuntimeError:
        return False


def send(x: mx.array, dst: int, group: mx.distributed.Group) -> mx.array:
    """Send `x` to rank `dst`; returns `x` made to depend on the send, so
    the send happens when the result is evaluated."""
    sent = [mx.distributed.send(p, dst, group=group) for p in _pieces(x)]
    out = mx.depends(x, sent)
    if x.nbytes > EVAL_ABOVE_BYTES:
        mx.eval(out)
    return out


def recv_like(x: mx.array, src: int, group: mx.distributed.Group) -> mx.array:
    """Receive an array shaped like `x` from rank `src` (sent by `send`)."""
    return _join([mx.distributed.recv_like(p, src, group=group) for p in _pieces(x)], x)


def broadcast(x: mx.array, src: int, group: mx.distributed.Group) -> mx.array:
    """Every rank gets rank `src`'s `x` (there is no broadcast in
    mx.distributed: the others add zeros, which keeps the sum exact)."""
    if group.rank() != src:
        # Zeros that still depend on x, so work queued behind x (a send) runs.
        x = mx.depends(mx.zeros_like(x), x)
    return all_sum(x, group)


def settle() -> None:
    """Wait for all queued work, mlx-lm's generation stream included.

    generate_step queues the next step before it yields, so when a
    generation ends a forward pass (with its collectives) may still be in
    flight there; a control collective issued on another stream meanwhile
    could pair with one of its all_sums on another rank. `mx.synchronize()`
    alone waits only for the default stream."""
    mx.synchronize(generation_stream)
    mx.synchronize()


def barrier(group: mx.distributed.Group) -> None:
    """Wait for every rank, after settling in-flight work."""
    settle()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
