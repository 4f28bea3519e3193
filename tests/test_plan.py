"""Detection, planning and the local-expert computation, in one process."""

import mlx.core as mx
import pytest
from mlx_lm.utils import _get_classes

from mlx_moe import PlanError, plan
from mlx_moe.parallel import expert
from mlx_moe.parallel.expert import Absent, ExpertParallelBlock, LocalExperts, find_moe_blocks
from mlx_moe.parallel.plan import module_at, split_evenly
from mlx_moe.parallel.simulate import LocalGroup, shard_in_process


def build(config):
    mx.random.seed(1)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


BASE = dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, vocab_size=64, rope_theta=1e4,
            tie_word_embeddings=False, max_position_embeddings=512)
QWEN3_MOE = dict(BASE, model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2,
                 decoder_sparse_step=1, mlp_only_layers=[1], moe_intermediate_size=32,
                 norm_topk_prob=True)
QWEN2_MOE = dict(BASE, model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=48)
LLAMA = dict(BASE, model_type="llama")


def test_plan_detects_moe_and_dense_layers():
    p = plan(build(QWEN3_MOE), LocalGroup(2), "expert")
    assert p.strategy == "expert"
    kinds = {l.index: l.kind for l in p.layers}
    assert kinds == {0: "moe", 1: "dense", 2: "moe"}
    moe = p.moe_layers[0]
    assert (moe.num_experts, moe.top_k, moe.shared) == (6, 2, ())
    assert moe.ranges == [(0, 3), (3, 6)]
    table = str(p)
    assert "model.layers.0.mlp" in table and "3-5" in table and "replicated" in table


def test_auto_picks_expert_for_moe():
    assert plan(build(QWEN3_MOE), LocalGroup(3), "auto").strategy == "expert"


def test_shared_experts_detected():
    p = plan(build(QWEN2_MOE), LocalGroup(3), "expert")
    assert all(l.shared == ("shared_expert",) for l in p.moe_layers)
    assert p.moe_layers[0].shared_rank is not None


def test_impossible_requests_fail_early_with_the_fix():
    with pytest.raises(PlanError, match="at most 6 ranks"):
        plan(build(QWEN3_MOE), LocalGroup(8), "expert")
    with pytest.raises(PlanError, match="no MoE block.*pipeline"):
        plan(build(LLAMA), LocalGroup(2), "expert")
    with pytest.raises(PlanError, match="Unknown strategy 'sequence'; choose one of: auto, expert, pipeline, "
                                        "hybrid, tensor"):
        plan(build(QWEN3_MOE), LocalGroup(2), "sequence")
    with pytest.raises(PlanError, match="expert_weights has 3 entries for 2 ranks"):
        plan(build(QWEN3_MOE), LocalGroup(2), "expert", expert_weights=[1, 1, 1])


def test_split_evenly():
    assert split_evenly(10, [1, 1, 1]) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(8, [2, 1, 1]) == [(0, 4), (4, 6), (6, 8)]
    assert split_evenly(4, [100, 1]) == [(0, 3), (3, 4)]


@pytest.mark.parametrize("path", ["masked", "gathered"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("config", [QWEN3_MOE, QWEN2_MOE], ids=["qwen3_moe", "qwen2_moe"])
def test_partial_outputs_sum_to_the_block(config, tokens, path, monkeypatch):
    monkeypatch.setattr(expert, "GATHER_MIN_TOKENS", 1 if path == "gathered" else 10**9)
    model = build(config)
    shards = shard_in_process(model, 3)
    x = mx.random.normal((1, tokens, config["hidden_size"]))
    for layer in shards[0][1].moe_layers:
        want = module_at(model, layer.path)(x)
        parts = []
        for m, _ in shards:
            wrapped = module_at(m, layer.path)
            assert isinstance(wrapped, ExpertParallelBlock)
            parts.append(wrapped.block(x))  # this rank's partial, before the combine
        got = sum(parts)
        assert mx.abs(got - want).max().item() < 1e-5
        if tokens > 1:
            # Work is split: more than one rank contributes.
            assert sum(mx.abs(p).max().item() > 0 for p in parts) >= 2


def test_shared_expert_lives_on_one_rank():
    shards = shard_in_process(build(QWEN2_MOE), 3)
    for layer in shards[0][1].moe_layers:
        holders = [not isinstance(module_at(m, layer.path).block.shared_expert, Absent)
                   for m, _ in shards]
        assert sum(holders) == 1


def test_local_experts_hold_only_their_rows():
    shards = shard_in_process(build(QWEN3_MOE), 2)
    for m, p in shards:
        for layer in p.moe_layers:
            local = module_at(m, layer.path).block.switch_mlp
            assert isinstance(local, LocalExperts)
            assert local.experts.gate_proj.weight.shape[0] == 3


def test_find_moe_blocks_by_type_not_name():
    paths = [p for p, _, _ in find_moe_blocks(build(QWEN3_MOE))]
    assert paths == ["model.layers.0.mlp", "model.layers.2.mlp"]


@pytest.mark.parametrize("strategy,config", [("expert", QWEN3_MOE), ("expert", QWEN2_MOE),
                                             ("pipeline", QWEN3_MOE), ("pipeline", LLAMA)])
def test_held_bytes_predicts_the_shard_before_reading(strategy, config):
    """The loader's memory check uses this before any weight is read."""
    from mlx_moe.loader import held_bytes, param_bytes

    model = build(config)
    sizes = []
    for m, p in shard_in_process(model, 3, strategy=strategy):
        want = held_bytes(model, p)  # the unsharded model and this rank's plan
        assert want == param_bytes(m), (p.rank, want, param_bytes(m))
        sizes.append(want)
    assert max(sizes) < param_bytes(model)
