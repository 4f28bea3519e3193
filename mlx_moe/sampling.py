"""Sampling that every rank does alike without exchanging tokens: each
request draws with its own seeded key. Used by batch_generate and the
serving engine."""

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


def request_sampler(spec: dict):
    """A sampler for one request (Job.spec) that does not touch the global
    random state: its own key, split at every token, so a seeded request
    draws the same tokens alone or in any batch, on every rank. None (the
    generator's batched argmax) for temperature 0."""
    temperature, top_p, top_k, min_p = (spec[k] for k in ("temperature", "top_p", "top_k", "min_p"))
    if temperature == 0:
        return None
    key = mx.random.key(spec["seed"])

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        # mlx-lm's make_sampler order: top_p, min_p, then top_k.
        if top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample
