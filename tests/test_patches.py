"""mlx_moe/patches.py: each change to mlx's and mlx-lm's objects is undone."""

import types

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_moe.patches import restore_class, settled_clear_cache, swap_global, with_call


def test_settled_clear_cache_settles_first_and_is_undone():
    original, calls = mx.clear_cache, []
    with settled_clear_cache(lambda: calls.append("outer")):
        assert mx.clear_cache is not original
        mx.clear_cache()
        with settled_clear_cache(lambda: calls.append("inner")):  # nested: the outer one stays
            mx.clear_cache()
        mx.clear_cache()
    assert calls == ["outer"] * 3
    assert mx.clear_cache is original


def test_settled_clear_cache_is_undone_when_the_block_raises():
    original = mx.clear_cache
    with pytest.raises(RuntimeError):
        with settled_clear_cache(lambda: None):
            raise RuntimeError("the engine failed")
    assert mx.clear_cache is original


def _doubled(self, x):
    return 2 * super(type(self), self).__call__(x)


def test_with_call_changes_one_instance_and_is_undone():
    mx.random.seed(0)
    layer, other = nn.Linear(4, 3), nn.Linear(4, 3)
    x = mx.ones((1, 4))
    plain = layer(x)
    with_call(layer, _doubled)
    assert isinstance(layer, nn.Linear) and type(other) is nn.Linear
    assert mx.allclose(layer(x), 2 * plain)
    twin = nn.Linear(4, 3)
    with_call(twin, _doubled)
    assert type(twin) is type(layer)  # one subclass per (class, call)
    restore_class(layer)
    assert type(layer) is nn.Linear and mx.allclose(layer(x), plain)
    restore_class(other)  # not swapped: unchanged
    assert type(other) is nn.Linear


def test_swap_global_replaces_only_the_expected_function():
    def original(): ...
    def new(): ...
    def theirs(): ...
    module = types.SimpleNamespace(f=original)
    assert swap_global(module, "f", original, new) and module.f is new
    assert swap_global(module, "f", original, new) and module.f is new  # again: still new
    other = types.SimpleNamespace(f=theirs)
    assert not swap_global(other, "f", original, new) and other.f is theirs
    assert not swap_global(None, "f", original, new)
