"""Attention split for long inputs: which heads each rank computes (the
split itself is held against single-process logits on real ranks in
test_expert_parallel.py and test_architectures.py)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base

from mlx_moe.parallel.attention import head_range, split_attention


@pytest.mark.parametrize("heads,kv_heads,size,want", [
    (8, 4, 2, [(0, 4, 0, 2), (4, 8, 2, 4)]),  # grouped: whole groups per rank
    (8, 8, 2, [(0, 4, 0, 4), (4, 8, 4, 8)]),  # one kv head per query head
    (8, 1, 2, [(0, 4, 0, 1), (4, 8, 0, 1)]),  # multi-query: both read the one kv head
    (32, 4, 8, [(4 * r, 4 * r + 4, r // 2, r // 2 + 1) for r in range(8)]),  # half a group each
    (12, 6, 4, None),  # 3 query heads per rank straddle groups of 2
    (12, 4, 8, None),  # 12 heads do not split 8 ways
])
def test_head_ranges_keep_the_grouped_query_mapping(heads, kv_heads, size, want):
    got = [head_range(heads, kv_heads, size, r) for r in range(size)]
    assert got == (want or [None] * size)
    for r in (range(size) if want else ()):
        q0, q1, kv0, kv1 = got[r]
        rep, rep_here = heads // kv_heads, (q1 - q0) // (kv1 - kv0)
        # Query head h reads kv head h // rep, before and after slicing.
        assert [h // rep for h in range(q0, q1)] == [kv0 + j // rep_here for j in range(q1 - q0)]


def test_outside_a_splitting_model_it_is_mlx_lm_attention():
    rng = np.random.RandomState(0)
    q, k, v = (mx.array(rng.randn(1, h, 20, 16).astype(np.float32)) for h in (4, 2, 2))
    want = base.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask="causal")
    got = split_attention(q, k, v, cache=None, scale=0.25, mask="causal")
    assert mx.array_equal(got, want)
