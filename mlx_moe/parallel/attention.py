"""Split attention for long inputs under expert parallelism.

Expert parallel keeps attention whole on every rank, which costs one
combine per layer in decode but makes every rank compute all of a long
prompt's attention. For a prefill-sized input each rank therefore computes
the attention core (softmax(q k^T) v, the part that grows with prompt
length times context) for 1/N of the heads, and one all_gather joins the
heads; on the CPU the attention's projections are also split, each rank
computing 1/N of the tokens' rows. Every rank still ends up with all of
q, k, v and the output, so the KV cache needs no gathering before decode
and the model code is untouched: the hook replaces the
`scaled_dot_product_attention` that mlx-lm's model modules import from
`mlx_lm.models.base` (and the class of the attention's linear layers), and
splits only inside a model that installed it (other models in the process
run the original).
"""

import contextvars
import inspect
import sys
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base

from ..patches import swap_global, with_call
from . import comm, data_parallel

# Queries per call from which the core is split: decode steps (one token)
# stay replicated, so decode keeps one collective per MoE layer.
MIN_QUERIES = 16
# Context length from which splitting pays. On the CPU the core is slow
# (mlx[cpu] uses the reference BLAS: ~2 GFLOP/s here) and always pays. On a
# GPU a rank saves 4*S*D flops per query head per row it does not compute
# and receives D values for it instead: at ~15 TFLOP/s and ~8 GB/s (bf16)
# that breaks even near S = 1000 keys; 4096 leaves room for slower links.
MIN_KEYS = 1 if mx.default_device() == mx.cpu else 4096
# Tokens per sequence from which the attention's projections are split by
# rows (a batch of decode steps, one token each, stays whole: decode keeps
# one collective per MoE layer however large the batch).
# On the CPU a 2048-token prompt spends about as long in them as in the
# core. On a GPU a linear layer does about `in` flops per byte of output it
# would gather, near the break-even of ~15 TFLOP/s over ~8 GB/s for these
# models, so it stays whole there.
MIN_ROWS = 16 if mx.default_device() == mx.cpu else None

_ORIGINAL = base.scaled_dot_product_attention
_SIGNATURE = inspect.signature(_ORIGINAL)
_GROUP = contextvars.ContextVar("mlx_moe_attention_split_group", default=None)


def head_range(heads: int, kv_heads: int, size: int, rank: int) -> Optional[Tuple[int, int, int, int]]:
    """(q0, q1, kv0, kv1): the query heads of `rank` and the key/value heads
    they read, such that the slices keep mlx's grouped-query mapping (query
    head h reads kv head h // (heads / kv_heads)). None when the heads do not
    split evenly that way."""
    if heads % size or heads % kv_heads:
        return None
    per, rep = heads // size, heads // kv_heads
    # Each rank takes whole groups, or a part of one group.
    if per % rep and rep % per:
        return None
    q0, q1 = rank * per, (rank + 1) * per
    return q0, q1, q0 // rep, (q1 - 1) // rep + 1


def _heads(x, lo, hi, count):
    """x sliced to heads [lo, hi) on axis -3 if that axis holds `count` heads
    (a broadcast axis of 1, a string mask or None pass through)."""
    if isinstance(x, mx.array) and x.ndim >= 3 and x.shape[-3] == count and count > 1:
        return x[..., lo:hi, :, :]
    return x


def split_attention(*args, **kwargs):
    """mlx-lm's scaled_dot_product_attention, computed for this rank's heads
    and gathered when a model prepared by split_long_attention calls it on
    a long input."""
    group = _GROUP.get()
    # Decode steps leave here, before any argument handling.
    if group is None or (args[0] if args else kwargs["queries"]).shape[-2] < MIN_QUERIES:
        return _ORIGINAL(*args, **kwargs)
    a = _SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    q, k, v, cache = a.arguments["queries"], a.arguments["keys"], a.arguments["values"], a.arguments["cache"]
    if hasattr(cache, "bits") or not isinstance(k, mx.array) or k.shape[-2] < MIN_KEYS:
        return _ORIGINAL(*a.args, **a.kwargs)
    heads, kv_heads = q.shape[1], k.shape[1]
    split = head_range(heads, kv_heads, group.size(), group.rank())
    if split is None or v.shape[1] != kv_heads:
        return _ORIGINAL(*a.args, **a.kwargs)
    q0, q1, kv0, kv1 = split
    sinks = a.arguments["sinks"]
    out = _ORIGINAL(
        q[:, q0:q1], k[:, kv0:kv1], v[:, kv0:kv1], cache, a.arguments["scale"],
        _heads(a.arguments["mask"], q0, q1, heads),
        sinks=sinks[q0:q1] if sinks is not None and sinks.size == heads else sinks,
    )
    # all_gather stacks on axis 0: put heads there and back.
    return comm.all_gather(out.swapaxes(0, 1), group).swapaxes(0, 1)


def _split_rows(self, x):
    """A linear layer on this rank's 1/N of the rows of `x`, gathered."""
    group = _GROUP.get()
    rows = x.size // x.shape[-1]
    if group is None or (x.shape[-2] if x.ndim > 2 else rows) < MIN_ROWS:
        return super(type(self), self).__call__(x)
    n = group.size()
    per = -(-rows // n)
    part = x.reshape(-1, x.shape[-1])[group.rank() * per:(group.rank() + 1) * per]
    # The last rank's share, padded to the others' shape.
    part = mx.pad(part, [(0, per - part.shape[0]), (0, 0)])
    y = comm.all_gather(super(type(self), self).__call__(part), group)[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _call_splitting(self, *args, **kwargs):
    # Data-parallel forwards keep attention whole: the ranks' inputs differ.
    token = _GROUP.set(None if data_parallel.current() else self._split_group)
    try:
        return super(type(self), self).__call__(*args, **kwargs)
    finally:
        _GROUP.reset(token)


def split_long_attention(model: nn.Module, group) -> None:
    """Make `model` split the attention of long inputs across `group`'s
    ranks. An architecture that computes attention its own way (not through
    mlx-lm's scaled_dot_product_attention) keeps it whole."""
    patched = False
    for _, m in model.named_modules():
        # Outside a model that installed it, split_attention is the original.
        if swap_global(sys.modules.get(type(m).__module__), "scaled_dot_product_attention",
                       _ORIGINAL, split_attention):
            patched = True
        code = getattr(getattr(type(m), "__call__", None), "__code__", None)
        if MIN_ROWS is not None and code is not None and "scaled_dot_product_attention" in code.co_names:
            # The attention's own projections (q, k, v, o and the like).
            for child in m.children().values():
                if type(child) in (nn.Linear, nn.QuantizedLinear):
                    with_call(child, _split_rows)
    if patched:
        with_call(model, _call_splitting)
        model._split_group = group
