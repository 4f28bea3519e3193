"""The changes mlx-moe makes to mlx's and mlx-lm's objects, where they
offer no hook (mlx 0.32, mlx-lm 0.32):

- mlx-lm's BatchGenerator calls `mx.clear_cache()` itself (after each
  prompt chunk, every 512 decode steps), with no option to leave it out or
  pass another; `settled_clear_cache` changes it for a block.
- mlx's `nn.Module` has no forward hooks: `with_call` gives one module
  instance another `__call__`.
- mlx-lm's models call `scaled_dot_product_attention` as a global of their
  own module (imported from `mlx_lm.models.base`): `swap_global` replaces it
  there.
"""

import contextlib
from typing import Callable

import mlx.core as mx


@contextlib.contextmanager
def settled_clear_cache(settle: Callable[[], None]):
    """Within the block, `mx.clear_cache()` first calls `settle`.

    mx.clear_cache waits for queued work while holding the GIL, so a peer
    that stalled during that wait froze every thread of the rank, the
    watchdog too; `settle` (comm.settle) waits in mx.synchronize, which
    releases the GIL, and leaves it nothing to wait for. Inside another such
    block it changes nothing; on leaving, the original is back."""
    original = mx.clear_cache
    if getattr(original, "settled", False):
        yield
        return

    def clear():
        settle()
        original()

    clear.settled = True
    mx.clear_cache = clear
    try:
        yield
    finally:
        mx.clear_cache = original


_SUBCLASSES = {}


def with_call(module, call: Callable) -> None:
    """Give `module` (this instance only) `call` as its __call__, which
    reaches its class's own through super: a subclass made once per (class,
    call), so swapped instances share it. `restore_class` undoes it."""
    cls = type(module)
    if (cls, call) not in _SUBCLASSES:
        _SUBCLASSES[cls, call] = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__})
    module.__class__ = _SUBCLASSES[cls, call]


def restore_class(module) -> None:
    """Undo `with_call` on `module`."""
    if type(module) in _SUBCLASSES.values():
        module.__class__ = type(module).__bases__[0]


def swap_global(namespace, name: str, original, new) -> bool:
    """Set `namespace.name` to `new` where it is `original` (or `new`
    already); whether it is `new` now. Every user of that module sees it, so
    `new` must behave as `original` wherever it is not meant to differ."""
    if namespace is None or getattr(namespace, name, None) not in (original, new):
        return False
    setattr(namespace, name, new)
    return True
