"""Expert-load counting and placements, in one process: a placement moves
experts between ranks and leaves the model's output unchanged."""

import random

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_moe import PlanError, plan
from mlx_moe.parallel import expert
from mlx_moe.parallel.expert import expert_loads
from mlx_moe.parallel.plan import module_at
from mlx_moe.parallel.placement import (balance, balanced, contiguous, imbalance, read_loads,
                               read_placement, write_placement)
from mlx_moe.parallel.simulate import LocalGroup, combined, max_logit_diff, shard_in_process
from test_plan import QWEN2_MOE, QWEN3_MOE, build


def _shuffled(num_experts, sizes, seed=0):
    ids = list(range(num_experts))
    random.Random(seed).shuffle(ids)
    out, lo = [], 0
    for n in sizes:
        out.append(sorted(ids[lo : lo + n]))
        lo += n
    return out


def test_balance_evens_out_skewed_loads():
    counts = [100, 90, 80, 70, 5, 4, 3, 2]  # the contiguous split puts the hot half on rank 0
    first = contiguous(8, 2)
    placed = balance(counts, [4, 4])
    assert sorted(e for r in placed for e in r) == list(range(8))
    assert [len(r) for r in placed] == [4, 4]
    assert imbalance(counts, first) > 1.8
    assert imbalance(counts, placed) < 1.05
    # Uneven capacities are kept (memory stays as planned).
    assert [len(r) for r in balance(counts, [5, 3])] == [5, 3]


@pytest.mark.parametrize("path", ["masked", "gathered"])
@pytest.mark.parametrize("config", [QWEN3_MOE, QWEN2_MOE], ids=["qwen3_moe", "qwen2_moe"])
def test_placed_experts_give_the_same_logits(config, path, monkeypatch):
    monkeypatch.setattr(expert, "GATHER_MIN_TOKENS", 1 if path == "gathered" else 10**9)
    model = build(config)
    blocks = [l.path for l in plan(model, LocalGroup(3), "expert").moe_layers]
    placement = {p: _shuffled(6, [2, 3, 1], seed=i) for i, p in enumerate(blocks)}
    sharded, p = combined(model, 3, placement=placement)
    for layer in p.moe_layers:
        assert [sorted(layer.experts_of(r)) for r in range(3)] == placement[layer.path]
    inputs = [[5], list(range(3, 40))]
    assert max_logit_diff(model, sharded, inputs) < 1e-5


def test_each_rank_holds_the_rows_of_its_placed_experts():
    model = build(QWEN3_MOE)
    blocks = [l.path for l in plan(model, LocalGroup(2), "expert").moe_layers]
    placement = {blocks[0]: [[1, 4, 5], [0, 2, 3]]}
    for m, p in shard_in_process(model, 2, placement=placement):
        local = m.model.layers[0].mlp.block.switch_mlp
        want = model.model.layers[0].mlp.switch_mlp.gate_proj.weight[mx.array(placement[blocks[0]][p.rank])]
        assert mx.array_equal(local.experts.gate_proj.weight, want)
        # The block the placement does not name keeps contiguous ranges.
        assert p.moe_layers[1].experts_of(p.rank) == [[0, 1, 2], [3, 4, 5]][p.rank]


def test_bad_placements_fail_with_the_fix():
    model = build(QWEN3_MOE)
    with pytest.raises(PlanError, match="exactly once"):
        plan(model, LocalGroup(2), "expert", placement={"model.layers.0.mlp": [[0, 1, 2], [2, 3, 4]]})
    with pytest.raises(PlanError, match="has 3 ranks; the cluster has 2"):
        plan(model, LocalGroup(2), "expert", placement={"model.layers.0.mlp": [[0, 1], [2, 3], [4, 5]]})
    with pytest.raises(PlanError, match="another model"):
        plan(model, LocalGroup(2), "expert", placement={"model.layers.9.mlp": [[0, 1, 2], [3, 4, 5]]})


class Recording(nn.Module):
    """An experts container that notes the expert ids it is asked for."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def __call__(self, x, indices):
        self.seen.append(indices.flatten())
        return self.inner(x, indices)


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_counts_are_the_routed_pairs(path, monkeypatch):
    monkeypatch.setattr(expert, "GATHER_MIN_TOKENS", 1 if path == "gathered" else 10**9)
    model = build(QWEN3_MOE)
    sharded, p = combined(model, 2)
    for layer in p.moe_layers:  # after sharding: the oracle keeps the original experts
        block = module_at(model, layer.path)
        block.switch_mlp = Recording(block.switch_mlp)
    inputs = [list(range(3, 20)), [7], [9, 4, 1, 30]]
    for ids in inputs:
        mx.eval(sharded(mx.array([ids])), model(mx.array([ids])))
    loads = expert_loads(sharded)
    # combined() runs every rank's shard, and each rank counts every pair.
    assert sorted({l.path for l in loads}) == sorted(l.path for l in p.moe_layers)
    assert len(loads) == 2 * len(p.moe_layers)
    for load in loads:
        seen = mx.concatenate(module_at(model, load.path).switch_mlp.seen)
        want = [int((seen == e).sum().item()) for e in range(6)]
        assert load.counts == want and sum(want) == 2 * sum(map(len, inputs))
        assert load.owner == [0, 0, 0, 1, 1, 1]
    # Collected counts are kept; new pairs add to them.
    mx.eval(sharded(mx.array([[5]])))
    assert sum(expert_loads(sharded)[0].counts) == 2 * (sum(map(len, inputs)) + 1)


def test_placement_and_load_files_round_trip(tmp_path):
    loads = {"model.layers.0.mlp": [9, 1, 1, 9, 0, 0]}
    placement = balanced(loads, 2)
    write_placement(placement, tmp_path / "placement.json")
    assert read_placement(tmp_path / "placement.json") == placement
    metrics = tmp_path / "metrics.txt"
    metrics.write_text(
        "# HELP mlx_moe_expert_tokens pairs routed to each expert\n"
        "# TYPE mlx_moe_expert_tokens counter\n"
        + "".join(f'mlx_moe_expert_tokens_total{{layer="model.layers.0.mlp",expert="{e}",rank="0"}} {c}\n'
                  for e, c in enumerate(loads["model.layers.0.mlp"])))
    assert read_loads(metrics) == {k: [float(c) for c in v] for k, v in loads.items()}


def test_placement_command_writes_a_balanced_file(tmp_path):
    import json
    import subprocess
    import sys

    loads = {"model.layers.0.mlp": [50, 40, 30, 20, 1, 1, 1, 1], "model.layers.2.mlp": [1] * 8}
    (tmp_path / "load.json").write_text(json.dumps({"layers": loads}))
    out = subprocess.run([sys.executable, "-m", "mlx_moe.cli", "placement", "--expert-load",
                          str(tmp_path / "load.json"), "--ranks", "2", "-o", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    placement = read_placement(tmp_path / "p.json")
    assert placement == balanced(loads, 2)
    first = out.stdout.splitlines()[1].split()
    assert first[0] == "model.layers.0.mlp" and float(first[1]) > 1.5 and float(first[2]) < 1.1
    # A bad file is named, with what to do.
    (tmp_path / "bad.txt").write_text("# nothing here\n")
    out = subprocess.run([sys.executable, "-m", "mlx_moe.cli", "placement", "--expert-load",
                          str(tmp_path / "bad.txt"), "--ranks", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "GET /metrics" in out.stderr


def test_serve_with_a_balanced_placement_answers_like_one_process(checkpoint, tmp_path):
    """`serve --placement balanced --expert-load FILE` on two real ranks."""
    import json
    import urllib.request

    import openai

    import oracle
    from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
    from test_serve import _chat, _start

    path = checkpoint("qwen3_moe", quantize=4)
    # Loads that make the balanced placement interleave experts across ranks.
    loads = {f"model.layers.{l}.mlp": [8, 7, 6, 5, 1, 1, 1, 1] for l in range(4)}
    (tmp_path / "load.json").write_text(json.dumps({"layers": loads}))
    port = free_port()
    proc = _start(path, port, "--placement", "balanced", "--expert-load", str(tmp_path / "load.json"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        with urllib.request.urlopen(url + "/v1/plan", timeout=30) as r:
            table = json.load(r)["plan"]
        assert "4 placed" in table, table
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        text, _, _ = _chat(client, path, "Where does the river run?", max_tokens=16)
        assert text == oracle.greedy_text(path, oracle.chat_prompt(path, "Where does the river run?"), 16)
    finally:
        stop_group(proc)


def test_masked_path_reads_no_expert_a_token_does_not_use(monkeypatch):
    """Foreign pairs are pointed at an expert the token already uses on this
    rank, so a GPU reads no extra expert for them."""
    monkeypatch.setattr(expert, "GATHER_MIN_TOKENS", 10**9)
    model = build(QWEN3_MOE)
    for m, p in shard_in_process(model, 2):
        layer = p.moe_layers[0]
        local = module_at(m, layer.path).block.switch_mlp
        local.experts = Recording(local.experts)
        indices = mx.array([[[0, 4], [1, 2], [5, 3], [4, 5]]])  # [1, 4 tokens, top-2]
        x = mx.random.normal((1, 4, QWEN3_MOE["hidden_size"]))
        mx.eval(local(x, indices))
        ran = local.experts.seen[0].reshape(4, 2).tolist()
        lo, hi = layer.ranges[p.rank]
        for token, pairs in zip(indices[0].tolist(), ran):
            mine = {e - lo for e in token if lo <= e < hi}
            assert set(pairs) <= (mine or {0}), (p.rank, token, pairs)
