"""Imported at start by a rank whose PYTHONPATH a test points here: the
logits its model returns get noise uniform in +-$LOGIT_NOISE (logit_noise.py)."""

import os

_noise = float(os.environ.get("LOGIT_NOISE", "0"))
if _noise:
    import mlx_moe.loader
    from logit_noise import add_noise

    _load = mlx_moe.loader.load_sharded

    def _noisy_load(*args, **kwargs):
        model, tokenizer = _load(*args, **kwargs)
        add_noise(model, _noise, int(os.environ.get("MLX_RANK", "0")) + 1)
        return model, tokenizer

    mlx_moe.loader.load_sharded = _noisy_load
