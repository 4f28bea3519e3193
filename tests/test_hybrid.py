"""The `hybrid` strategy on real ranks: attention split by heads, dense
MLPs and shared experts by tensor parallel, routed experts by expert
parallel. Every architecture the expert-parallel suite covers is held
against the single-process mlx-lm model (logits, greedy text), with its
collectives counted; blocks that cannot be split stay replicated with the
reason in the plan. `tensor` (the experts split by tensor parallel too) on
one architecture of each family."""

import json
import urllib.request

import numpy as np

import oracle
from conftest import launch
from test_architectures import COVERED, FAMILIES, SPEC
from test_batching import _ask_all, _assert_single_process_answers, serving

TOLERANCE = {None: 1e-4, 4: 1e-3}
MAX_TOKENS = 12
INPUTS = [np.random.RandomState(5).randint(0, 400, n).tolist() for n in (1, 40)]
DENSE_FIRST = {"mlp_only_layers": [0]}  # qwen3_moe's layer 0 as a dense MLP
SIX_HEADS = {"num_attention_heads": 6, "num_key_value_heads": 3}  # they divide by 3 ranks
PER_LAUNCH = 22


def _checkpoints(checkpoint, cases):
    return [(checkpoint(arch, **SPEC, **({"quantize": bits} if bits else {}),
                        **({"overrides": over} if over else {})), bits) for arch, bits, over in cases]


def _run(paths, n, tmp_path, strategy="hybrid"):
    """Each checkpoint's run on n ranks: [per rank: [per checkpoint: result]]."""
    outs = [[] for _ in range(n)]
    for start in range(0, len(paths), PER_LAUNCH):
        runs = [{"checkpoint": str(p), "strategy": strategy, "inputs": INPUTS, "prompt": oracle.chat_prompt(p),
                 "max_tokens": MAX_TOKENS} for p, _ in paths[start:start + PER_LAUNCH]]
        out = tmp_path / str(start)
        out.mkdir()
        for mine, theirs in zip(outs, launch("sharded_worker", {"runs": runs}, n, out)):
            mine.extend(theirs)
    return outs


def _rows(plan: str) -> list:
    """(kind, holder or the experts of rank 0) of each block row of the plan's text."""
    return [(w[2], w[3 if w[2] != "moe" else 5]) for w in map(str.split, plan.splitlines()[2:])
            if len(w) > 3 and w[0].isdigit()]


def _assert_single_process(outs, paths, strategy="hybrid"):
    for i, (path, bits) in enumerate(paths):
        want = [oracle.last_logits(path, ids) for ids in INPUTS]
        text = oracle.greedy_text(path, oracle.chat_prompt(path), MAX_TOKENS)
        for rank, out in enumerate(outs):
            r = out[i]
            assert r["strategy"] == strategy, r["plan"]
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= TOLERANCE[bits], (path.name, rank)
            assert r["text"] == text, (path.name, rank)
            # In decode, one collective per split attention, per MoE block (a
            # shared expert's share joins the routed experts' combine) and per
            # split dense MLP.
            rows = _rows(r["plan"])
            split = sum(kind == "moe" or holder in ("heads", "tensor") for kind, holder in rows)
            assert r["decode_collectives"][0] == split, (path.name, r["plan"])


def test_every_architecture_on_two_ranks(checkpoint, tmp_path):
    cases = [(a, None, None) for a in COVERED] + [("qwen3_moe", 4, None), ("qwen3_moe", None, DENSE_FIRST)]
    paths = _checkpoints(checkpoint, cases)
    outs = _run(paths, 2, tmp_path)
    _assert_single_process(outs, paths)
    plans = [r["plan"] for r in outs[0]]
    plan = lambda *case: plans[cases.index(case)]
    qwen3 = outs[0][cases.index(("qwen3_moe", None, None))]
    assert [h for k, h in _rows(qwen3["plan"]) if k == "attention"] == ["heads"] * SPEC["layers"]
    assert qwen3["decode_collectives"][0] == 2 * SPEC["layers"]  # attention's and the MoE block's
    # Each rank caches its half of the KV heads.
    whole = oracle.kv_bytes(paths[cases.index(("qwen3_moe", None, None))][0], INPUTS[1])
    assert qwen3["kv_bytes"][1] <= 0.55 * whole, (qwen3["kv_bytes"], whole)
    assert "+sh/tp" in plan("qwen2_moe", None, None)  # its shared expert, split
    assert ("dense", "tensor") in _rows(plan("qwen3_moe", None, DENSE_FIRST))
    assert "latent attention (MLA)" in plan("deepseek_v3", None, None)  # replicated, and why
    # Most architectures split their attention.
    assert sum(("attention", "heads") in _rows(p) for p in plans) >= 20


def test_tensor_on_each_family(checkpoint, tmp_path):
    cases = [(family[0], None, None) for family in FAMILIES.values()] + [("qwen3_moe", 4, None)]
    paths = _checkpoints(checkpoint, cases)
    outs = _run(paths, 2, tmp_path, "tensor")
    _assert_single_process(outs, paths, "tensor")
    qwen3 = outs[0][-1]  # 4-bit
    assert [h for k, h in _rows(qwen3["plan"]) if k == "moe"] == ["0-7"] * SPEC["layers"]  # every expert
    assert qwen3["decode_collectives"][0] == 2 * SPEC["layers"]


def test_three_ranks_split_where_heads_divide(checkpoint, tmp_path):
    paths = _checkpoints(checkpoint, [("qwen3_moe", None, None), ("qwen3_moe", None, SIX_HEADS)])
    outs = _run(paths, 3, tmp_path)
    _assert_single_process(outs, paths)
    four, six = outs[0]
    assert [h for k, h in _rows(four["plan"]) if k == "attention"] == ["replicated"] * SPEC["layers"]
    assert "4 query and 2 KV heads do not divide by 3 ranks" in four["plan"]
    assert [h for k, h in _rows(six["plan"]) if k == "attention"] == ["heads"] * SPEC["layers"]


def test_sixteen_batched_requests_on_a_hybrid_server(checkpoint):
    """`serve --strategy hybrid`: 16 concurrent greedy answers equal single-process."""
    path = checkpoint("qwen3_moe")  # float32, as test_batching's
    with serving(path, "--strategy", "hybrid") as url:
        with urllib.request.urlopen(url + "/v1/status", timeout=30) as r:
            assert json.load(r)["cluster"]["strategy"] == "hybrid"
        _assert_single_process_answers(_ask_all(url, path), path)
