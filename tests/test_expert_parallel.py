"""Expert parallel on real ranks (ring over 127.0.0.1) against the
single-process mlx-lm model: logits, greedy text, memory, collectives."""

import json

import numpy as np
import pytest

import oracle
from conftest import attention_gathers, launch
from mlx_moe.checkpoints.checkpoint import Checkpoint

LONG = 70  # >= 32 tokens: the gathered (prefill) path
MAX_TOKENS = 24
TOLERANCE = {None: 1e-4, 4: 1e-3}


@pytest.fixture(scope="module")
def models(checkpoint):
    # 8 and 10 experts: 3 ranks split both unevenly (3/3/2 and 4/3/3).
    return [
        (checkpoint("qwen3_moe", experts=8, top_k=2), None),
        (checkpoint("qwen3_moe", experts=10, top_k=3, quantize=4), 4),
    ]


@pytest.mark.parametrize("ranks", [2, 3])
def test_expert_parallel_matches_single_process(models, ranks, tmp_path):
    rng = np.random.RandomState(0)
    inputs = [[int(rng.randint(512))], rng.randint(0, 512, LONG).tolist()]
    prompt = oracle.chat_prompt(models[0][0])
    runs = [{"checkpoint": str(p), "strategy": "expert", "inputs": inputs,
             "prompt": prompt, "max_tokens": MAX_TOKENS} for p, _ in models]
    outs = launch("sharded_worker", {"runs": runs}, ranks, tmp_path)

    for i, (path, bits) in enumerate(models):
        want = [oracle.last_logits(path, ids) for ids in inputs]
        text = oracle.greedy_text(path, prompt, MAX_TOKENS)
        single_total, experts_total = oracle.param_bytes(path)
        replicated = single_total - experts_total
        largest = max(m["data_offsets"][1] - m["data_offsets"][0]
                      for _, _, m in Checkpoint(path).tensors.values())
        for rank, out in enumerate(outs):
            r = out[i]
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= TOLERANCE[bits], (rank, bits)
            assert r["text"] == text and text.strip()
            # Each rank holds only its experts.
            ranges = r["ranges"][0]
            lo, hi = ranges[rank]
            bound = (replicated + experts_total * (hi - lo) / ranges[-1][1]) * 1.02
            assert r["param_bytes"]["total"] <= bound, (rank, r["param_bytes"], bound)
            assert r["param_bytes"]["total"] < single_total
            assert r["active_bytes"] <= bound, (rank, r["active_bytes"], bound)
            assert r["peak_load_bytes"] <= 1.25 * r["param_bytes"]["total"] + largest, (
                rank, r["peak_load_bytes"], r["param_bytes"]["total"], largest)
            # One combine per MoE layer for a one-token forward and a decode step.
            assert r["collectives"][0] == r["moe_layers"] > 0
            assert r["decode_collectives"] == [r["moe_layers"]] * len(inputs)
            # The long input's attention is split (on the CPU): per layer its q, k, v
            # and o projections gather rows and the core gathers heads, then one combine.
            if ranks == 2:
                assert r["collectives"][1] == (attention_gathers(LONG) + 1) * r["moe_layers"], r["collectives"]
        # The ranks partition the experts.
        ranges = outs[0][i]["ranges"][0]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if ranks == 3:
            assert len({hi - lo for lo, hi in ranges}) == 2, f"expected an uneven split, got {ranges}"


def test_placed_experts_match_single_process(models, tmp_path):
    """A placement file moves experts between ranks; output is unchanged."""
    from mlx_moe.parallel.placement import write_placement

    rng = np.random.RandomState(1)
    inputs = [[int(rng.randint(512))], rng.randint(0, 512, LONG).tolist()]
    prompt = oracle.chat_prompt(models[0][0])
    runs = []
    for i, (path, _) in enumerate(models):
        n = 8 if i == 0 else 10
        ids = rng.permutation(n).tolist()
        # Odd-sized shares on purpose: rank 0 holds 3 experts, rank 1 the rest.
        placement = {f"model.layers.{l}.mlp": [sorted(ids[:3]), sorted(ids[3:])] for l in range(4)}
        write_placement(placement, tmp_path / f"placement{i}.json")
        runs.append({"checkpoint": str(path), "strategy": "expert", "inputs": inputs, "prompt": prompt,
                     "max_tokens": MAX_TOKENS, "placement": str(tmp_path / f"placement{i}.json")})
    outs = launch("sharded_worker", {"runs": runs}, 2, tmp_path)
    for i, (path, bits) in enumerate(models):
        placement = runs[i]["placement"]
        want = [oracle.last_logits(path, ids) for ids in inputs]
        text = oracle.greedy_text(path, prompt, MAX_TOKENS)
        for rank, out in enumerate(outs):
            r = out[i]
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= TOLERANCE[bits], (rank, bits)
            assert r["text"] == text
            held = [sorted(e) for e in r["experts"]]
            assert held == [json.loads(open(placement).read())["layers"][f"model.layers.{l}.mlp"][rank]
                            for l in range(4)]
            # The permutation really moved experts: rank 0's are not one run.
            assert any(h != list(range(h[0], h[0] + len(h))) for h in held)
            single_total, experts_total = oracle.param_bytes(path)
            bound = (single_total - experts_total + experts_total * len(held[0]) / (8 if i == 0 else 10)) * 1.02
            assert r["param_bytes"]["total"] <= bound, (rank, r["param_bytes"], bound)
