"""The single-process mlx-lm model each sharded run is held against."""

import functools

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


@functools.lru_cache(maxsize=None)
def _load(path):
    return load(path)


def chat_prompt(path, text="Where does the river run?"):
    tokenizer = _load(str(path))[1]
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


PREFILL_STEP = 512  # a long prompt is read in chunks, as mlx-lm's generate does


def last_logits(path, ids):
    """The logits after `ids`. A long prompt in chunks through a KV cache:
    the same logits (measured: bit-identical at 2048 tokens), and half the
    time of one call at 8192 tokens (its attention scores are 8192 x 8192)."""
    model = _load(str(path))[0]
    if len(ids) <= PREFILL_STEP:
        return np.array(model(mx.array([ids]))[0, -1])
    cache = make_prompt_cache(model)
    for i in range(0, len(ids), PREFILL_STEP):
        logits = model(mx.array([ids[i:i + PREFILL_STEP]]), cache=cache)
        mx.eval(logits)
    return np.array(logits[0, -1])


def kv_bytes(path, ids) -> int:
    """Bytes of the single-process KV cache after reading `ids`."""
    model = _load(str(path))[0]
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids]), cache=cache))
    return sum(c.nbytes for c in cache)


def next_token(path, prompt):
    """The greedy choice after a text prompt."""
    tokenizer = _load(str(path))[1]
    return int(np.argmax(last_logits(path, tokenizer.encode(prompt))))


def greedy_text(path, prompt, max_tokens, **kw):
    model, tokenizer = _load(str(path))
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw)


def param_bytes(path):
    """(total, experts) parameter bytes of the single-process model."""
    model = _load(str(path))[0]
    nbytes = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    experts = sum(nbytes(m) for _, m in model.named_modules()
                  if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)))
    return nbytes(model), experts


def max_diff(got, want):
    return float(np.abs(np.array(got) - want).max())
