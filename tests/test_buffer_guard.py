"""Long prompts: every collective message stays under the bound, results
do not change, and decode still costs one collective per MoE layer."""

import numpy as np
import pytest

import oracle
from conftest import launch
from mlx_moe.parallel.comm import DEFAULT_MAX_COLLECTIVE_BYTES

BOUND = 64 * 1024


def test_2048_token_prompt_under_64k_messages(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe", hidden=128)  # a 1024-token chunk combine is 512 KiB
    ids = np.random.RandomState(2).randint(0, 512, 2048).tolist()
    runs = [{"checkpoint": str(path), "strategy": s, "inputs": [ids], "prefill_step": 1024,
             "max_collective_bytes": BOUND} for s in ("expert", "pipeline")]
    outs = launch("sharded_worker", {"runs": runs}, 2, tmp_path)
    want = oracle.last_logits(path, ids)
    for out in outs:
        for r in out:
            assert oracle.max_diff(r["logits"][0], want) <= 1e-4, r["strategy"]
            assert 0 < r["max_message_bytes"][0] <= BOUND, r["strategy"]
            # A chunk's 512 KiB hand-off or combine went as several messages.
            assert r["messages"][0] > r["collectives"][0], r["strategy"]
        expert = out[0]
        assert expert["decode_collectives"] == [expert["moe_layers"]]


@pytest.mark.slow
def test_8192_token_prompt_with_default_bound(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe")
    ids = np.random.RandomState(3).randint(0, 512, 8192).tolist()
    runs = [{"checkpoint": str(path), "strategy": "expert", "inputs": [ids], "prefill_step": 2048}]
    outs = launch("sharded_worker", {"runs": runs}, 2, tmp_path)
    want = oracle.last_logits(path, ids)
    for out in outs:
        r = out[0]
        assert oracle.max_diff(r["logits"][0], want) <= 1e-4
        assert 0 < r["max_message_bytes"][0] <= DEFAULT_MAX_COLLECTIVE_BYTES
        assert r["decode_collectives"] == [r["moe_layers"]]
