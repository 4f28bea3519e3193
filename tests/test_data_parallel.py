"""Data-parallel attention with expert-parallel MoE on real ranks (ring over
127.0.0.1): each rank runs its own sequences, the MoE layers gather every
rank's tokens and give each rank its rows back. Held against each
sequence alone in one process."""

import mlx.core as mx
import numpy as np
import pytest

import oracle
from conftest import attention_gathers, launch
from mlx_lm.models.cache import make_prompt_cache
from mlx_moe.parallel import comm

STEPS = 4  # greedy decode steps after each prompt


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", experts=8, top_k=2)


def prompts(seed, *lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, 512, n).tolist() for n in lengths]


def alone(path, prompt):
    """One sequence in one process: logits after the prompt and after each
    of STEPS greedy tokens, and the tokens."""
    model = oracle._load(str(path))[0]
    cache = make_prompt_cache(model)
    logits, tokens, x = [], [], prompt
    for _ in range(STEPS + 1):
        row = model(mx.array([x]), cache=cache)[0, -1]
        logits.append(np.array(row))
        tokens.append(int(mx.argmax(row)))
        x = tokens[-1:]
    return logits, tokens


def check_sequences(path, homes, outs):
    for rank, home in enumerate(homes):
        for p in outs[rank]["passes"]:
            assert len(p["seqs"]) == len(home)
            for prompt, got in zip(home, p["seqs"]):
                want, tokens = alone(path, prompt)
                assert got["tokens"] == tokens, (rank, len(prompt))
                assert len(got["logits"]) == STEPS + 1
                for g, w in zip(got["logits"], want):
                    assert oracle.max_diff(g, w) <= 1e-4, (rank, len(prompt))


def check_calls(outs):
    """Per forward: one all_gather and one combine per MoE layer, told
    apart by their bytes (the gather sends the largest rank's tokens, the
    combine all tokens, or with sum_scatter N blocks of the largest)."""
    size, layers, width = len(outs), outs[0]["moe_layers"], 4 * outs[0]["hidden"]
    for out in outs:
        assert out["sum_scatter"] == outs[0]["sum_scatter"] and out["probe"] == outs[0]["probe"]
        for p in out["passes"]:
            for call in p["calls"]:
                most, total = max(call["counts"]), sum(call["counts"])
                combine = size * most if out["sum_scatter"] else total
                assert call["collectives"] == 2 * layers > 0, call
                assert call["total_bytes"] == layers * width * (most + combine), call
    # Every rank made the same calls.
    assert len({len(p["calls"]) for o in outs for p in o["passes"]}) == 1


def test_sum_scatter_sends_bounded_pieces(monkeypatch):
    """comm.sum_scatter's pieces, with a backend that has it stood in (ring
    has none): rank 1 of 2, the other rank holding the same x."""

    class Group:
        size, rank = (lambda self: 2), (lambda self: 1)

    def fake(piece, group):
        half = piece.size // 2
        return 2 * piece[half:]  # this rank's half of the sum of two equal x

    monkeypatch.setattr(mx.distributed, "sum_scatter", fake)
    before = comm.max_message_bytes()
    comm.set_max_message_bytes(1024)
    comm.reset_comm_stats()
    try:
        x = mx.random.normal((2 * 10, 3, 11))  # 2 blocks of 330 floats
        y = comm.sum_scatter(x, Group())
    finally:
        comm.set_max_message_bytes(before)
    assert y.shape == (10, 3, 11) and mx.allclose(y, 2 * x[10:])
    stats = comm.comm_stats()
    assert stats["collectives"] == 1 and stats["messages"] == 3, stats  # 2 * 330 * 4 bytes in <= 1024
    assert stats["max_message_bytes"] <= 1024 and stats["total_bytes"] == x.nbytes


def test_two_ranks_uneven_batches(model_path, tmp_path):
    """Rank 0: 3 sequences (5, 9, 20 tokens: two prefill chunks), rank 1: 2
    (16, 4: one chunk, so it decodes while rank 0 still prefills, and idles
    in the last step); again with 1 KiB messages; then a replicated call.
    The first chunks are long enough (16) that a replicated forward would
    split their attention across the ranks: here it must not."""
    homes = [prompts(0, 5, 9, 20), prompts(1, 16, 4)]
    replicated = prompts(2, 20)[0]
    spec = {"checkpoint": str(model_path), "homes": homes, "chunk": 16, "decode_steps": STEPS,
            "bounds": [None, 1024], "replicated": replicated, "kv": prompts(3, *[32] * 4)}
    outs = launch("dp_worker", spec, 2, tmp_path, timeout=300)

    check_sequences(model_path, homes, outs)
    check_calls(outs)
    for out in outs:
        first, tiny = out["passes"]
        assert max(c["max_message_bytes"] for c in first["calls"]) > 1024
        assert max(c["max_message_bytes"] for c in tiny["calls"]) <= 1024
        assert any(c["messages"] > c["collectives"] for c in tiny["calls"])
        # The steps mixed a decode with a prefill chunk, and an idle rank.
        assert any(c["counts"] == [12, 2] for c in first["calls"])
        assert any(c["counts"] == [3, 0] for c in first["calls"])
        # The next call without home_tokens is replicated again, long
        # attention split on the CPU (q, k, v, o rows, heads, then the combine).
        want = oracle.last_logits(model_path, replicated)
        assert oracle.max_diff(out["replicated"]["logits"], want) <= 1e-4
        assert out["replicated"]["collectives"] == (attention_gathers(len(replicated)) + 1) * out["moe_layers"]
        # Even split: each rank holds half the KV cache of the replicated mode.
        kv = out["kv"]
        assert 0 < kv["data_parallel"] <= 0.55 * kv["replicated"], kv


def test_three_ranks_one_request(model_path, tmp_path):
    """1 request on 3 ranks: ranks 0 and 2 only join the collectives. The
    combine is sum_scatter's (all_sum standing in for the primitive ring
    lacks), so its padded layout is held against one process too."""
    homes = [[], prompts(4, 11), []]
    spec = {"checkpoint": str(model_path), "homes": homes, "chunk": 8, "decode_steps": STEPS,
            "bounds": [None], "replicated": prompts(5, 6)[0], "sum_scatter_standin": True}
    outs = launch("dp_worker", spec, 3, tmp_path, timeout=300)

    check_sequences(model_path, homes, outs)
    check_calls(outs)
    assert outs[0]["passes"][0]["calls"][0]["counts"] == [0, 8, 0] and outs[0]["sum_scatter"]
    want = oracle.last_logits(model_path, spec["replicated"])
    for out in outs:
        assert oracle.max_diff(out["replicated"]["logits"], want) <= 1e-4
