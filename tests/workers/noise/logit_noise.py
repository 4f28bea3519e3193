"""Noise uniform in +-amount on the logits a model returns, as a rank on
another kind of Mac computes slightly different floats."""

import mlx.core as mx


def add_noise(model, amount: float, seed: int) -> None:
    forward = type(model).__call__
    key = [mx.random.key(seed)]

    def noisy(self, *a, **kw):
        logits = forward(self, *a, **kw)
        key[0], sub = mx.random.split(key[0])
        return logits + mx.random.uniform(-amount, amount, logits.shape, key=sub).astype(logits.dtype)

    type(model).__call__ = noisy
