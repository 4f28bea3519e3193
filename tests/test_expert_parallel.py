"""Expert parallel on real ranks (ring over 127.0.0.1) against the
single-process mlx-lm model: logits, greedy text, memory, collectives."""

import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate, load

from conftest import launch
from mlx_moe.checkpoint import Checkpoint

LONG = 70  # >= 64 tokens: the gathered (prefill) path
MAX_TOKENS = 24
TOLERANCE = {None: 1e-4, 4: 1e-3}


def _inputs(vocab):
    rng = np.random.RandomState(0)
    return [[int(rng.randint(vocab))], rng.randint(0, vocab, LONG).tolist()]


def _reference(path, inputs, prompt):
    model, tokenizer = load(str(path))
    import mlx.core as mx

    logits = [np.array(model(mx.array([ids]))[0, -1]) for ids in inputs]
    params = dict(tree_flatten(model.parameters()))
    experts = sum(v.nbytes for k, v in params.items() if ".switch_mlp." in k)
    total = sum(v.nbytes for v in params.values())
    text = generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
    return logits, text, total, experts


@pytest.fixture(scope="module")
def models(checkpoint):
    # 8 and 10 experts: 3 ranks split both unevenly (3/3/2 and 4/3/3).
    return [
        (checkpoint("qwen3_moe", experts=8, top_k=2), None),
        (checkpoint("qwen3_moe", experts=10, top_k=3, quantize=4), 4),
    ]


@pytest.mark.parametrize("ranks", [2, 3])
def test_expert_parallel_matches_single_process(models, ranks, tmp_path):
    from mlx_lm import load as _load

    tokenizer = _load(str(models[0][0]))[1]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where does the river run?"}], add_generation_prompt=True
    )
    inputs = _inputs(tokenizer.vocab_size)
    spec = {"checkpoints": [str(p) for p, _ in models], "inputs": inputs,
            "prompt": prompt, "max_tokens": MAX_TOKENS}
    outs = launch("expert_worker", spec, ranks, tmp_path)

    for i, (path, bits) in enumerate(models):
        ref_logits, ref_text, single_total, experts_total = _reference(path, inputs, prompt)
        replicated = single_total - experts_total
        largest = max(m["data_offsets"][1] - m["data_offsets"][0]
                      for _, _, m in Checkpoint(path).tensors.values())
        for rank, out in enumerate(outs):
            r = out[i]
            for got, want in zip(r["logits"], ref_logits):
                diff = float(np.abs(np.array(got) - want).max())
                assert diff <= TOLERANCE[bits], (rank, bits, diff)
            assert r["text"] == ref_text
            assert r["text"].strip(), "generation produced no text"
            # Each rank holds only its experts.
            num_experts = r["ranges"][0][-1][1]
            lo, hi = r["ranges"][0][rank]
            bound = (replicated + experts_total * (hi - lo) / num_experts) * 1.02
            assert r["param_bytes"]["total"] <= bound, (rank, r["param_bytes"], bound)
            assert r["param_bytes"]["total"] < single_total
            assert r["active_bytes"] <= bound, (rank, r["active_bytes"], bound)
            assert r["peak_load_bytes"] <= 1.25 * r["param_bytes"]["total"] + largest, (
                rank, r["peak_load_bytes"], r["param_bytes"]["total"], largest)
            # One combine per MoE layer for a one-token forward.
            assert r["collectives"][0] == r["moe_layers"]
        # The ranks partition the experts.
        ranges = outs[0][i]["ranges"][0]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if ranks == 3:
            sizes = {hi - lo for lo, hi in ranges}
            assert len(sizes) == 2, f"expected an uneven split, got {ranges}"
