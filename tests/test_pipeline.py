"""Pipeline strategy on real ranks against the single-process model: dense
llama and qwen3, and qwen3_moe forced to pipeline."""

import numpy as np
import pytest
from mlx.utils import tree_flatten

import oracle
from conftest import launch

MAX_TOKENS = 24


def _bytes(module):
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _stage_bytes(path, lo, hi):
    """Parameter bytes of layers [lo, hi) plus everything outside the layers."""
    model = oracle._load(str(path))[0]
    layers = [_bytes(l) for l in model.layers]
    return _bytes(model) - sum(layers) + sum(layers[lo:hi])


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(1)
    return [[int(rng.randint(512))], rng.randint(0, 512, 70).tolist()]


@pytest.mark.parametrize("ranks", [2, 3])
def test_pipeline_matches_single_process(checkpoint, inputs, ranks, tmp_path):
    llama = checkpoint("llama", layers=6)
    # Sliding and full attention layers: masks come from the caches of the
    # first layer of each kind, which another stage may hold.
    mixed = checkpoint("llama", layers=6, overrides={
        "layer_types": ["sliding_attention", "full_attention"] * 3, "sliding_window": 16})
    cases = [  # (checkpoint, strategy, layer_weights)
        (llama, "auto", [1, 1, 4] if ranks == 3 else None),
        (mixed, "auto", [1, 1, 4] if ranks == 3 else None),
        (checkpoint("qwen3"), "auto", None),
        (checkpoint("qwen3_moe"), "pipeline", None),
    ]
    if ranks == 3:
        cases.append((checkpoint("qwen3_moe", experts=2, top_k=1), "auto", None))  # fewer experts than ranks
    prompt = oracle.chat_prompt(llama)
    # Prefill in chunks of 32 so later chunks build masks from cache offsets.
    runs = [{"checkpoint": str(p), "strategy": s, "layer_weights": w, "inputs": inputs,
             "prefill_step": 32, "prompt": prompt, "max_tokens": MAX_TOKENS} for p, s, w in cases]
    outs = launch("sharded_worker", {"runs": runs}, ranks, tmp_path)

    for i, (path, strategy, weights) in enumerate(cases):
        want = [oracle.last_logits(path, ids) for ids in inputs]
        text = oracle.greedy_text(path, prompt, MAX_TOKENS)
        single_total, _ = oracle.param_bytes(path)
        for rank, out in enumerate(outs):
            r = out[i]
            assert r["strategy"] == "pipeline", r["plan"]
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= 1e-4, (path.name, rank)
            assert r["text"] == text and text.strip()
            lo, hi = r["ranges"][0][rank]
            stage = _stage_bytes(path, lo, hi)
            assert abs(r["param_bytes"]["total"] - stage) <= 0.02 * stage, (rank, r["param_bytes"], stage)
            assert r["param_bytes"]["total"] < single_total
        sizes = [hi - lo for lo, hi in outs[0][i]["ranges"][0]]
        if weights:
            assert sizes == [1, 1, 4], sizes
        assert sum(sizes) == len(oracle._load(str(path))[0].layers)
