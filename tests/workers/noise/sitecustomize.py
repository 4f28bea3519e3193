"""Imported at start by a rank whose PYTHONPATH a test points here: the
logits its model returns get noise uniform in +-$LOGIT_NOISE, as a rank on
another kind of Mac computes slightly different floats."""

import os

_noise = float(os.environ.get("LOGIT_NOISE", "0"))
if _noise:
    import mlx.core as mx

    import mlx_moe.loader

    _load = mlx_moe.loader.load_sharded
    _key = [mx.random.key(int(os.environ.get("MLX_RANK", "0")) + 1)]

    def _noisy_load(*args, **kwargs):
        model, tokenizer = _load(*args, **kwargs)
        forward = type(model).__call__

        def noisy(self, *a, **kw):
            logits = forward(self, *a, **kw)
            _key[0], sub = mx.random.split(_key[0])
            return logits + mx.random.uniform(-_noise, _noise, logits.shape, key=sub).astype(logits.dtype)

        type(model).__call__ = noisy
        return model, tokenizer

    mlx_moe.loader.load_sharded = _noisy_load
