"""Every MoE architecture of mlx-lm that expert parallel serves, held
against the single-process mlx-lm model: on real ranks (several
architectures per launch, float32 and one 4-bit case per family), in one
process through mlx_moe.parallel.simulate, and with uneven expert placement."""

import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

import oracle
from conftest import attention_gathers, launch
from mlx_moe import PlanError, plan
from mlx_moe.parallel import expert
from mlx_moe.parallel.architectures import moe_model_types
from mlx_moe.parallel.simulate import LocalGroup, combined, max_logit_diff

SPEC = dict(layers=3, hidden=64, experts=8, top_k=2)
TOLERANCE = {None: 1e-4, 4: 1e-3}
MAX_TOKENS = 16
# A decode-sized and a prefill-sized input.
INPUTS = [np.random.RandomState(2).randint(0, 400, n).tolist() for n in (1, 40)]

# Architectures grouped by the block they share; the first of each family
# also runs 4-bit.
FAMILIES = {
    "qwen": ["qwen3_next", "qwen3_moe", "qwen2_moe", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"],
    "mixtral": ["mixtral", "phimoe", "olmoe", "minimax", "mellum", "jamba", "phixtral"],
    "granite": ["granitemoehybrid", "granitemoe"],
    "deepseek": ["deepseek_v3", "deepseek", "deepseek_v2", "deepseek_v32", "glm_moe_dsa",
                 "kimi_k25", "kimi_vl", "glm4_moe_lite", "mistral4", "mistral3"],
    "deepseek_v41": ["deepseek_v41"],
    "glm4": ["glm4_moe", "solar_open", "dots1", "exaone_moe", "mimo_v2_flash", "afmoe"],
    "kimi": ["kimi_k3", "kimi_linear"],
    "bailing": ["bailing_hybrid", "bailing_moe", "bailing_moe_linear", "bailing_moe_v3"],
    "own shared-expert mix": ["Klear", "hunyuan", "ernie4_5_moe", "laguna", "step3p5", "minimax_m3_vl"],
    "gpt_oss": ["gpt_oss"],
    "llama4": ["llama4"],
    "longcat": ["longcat_flash", "longcat_flash_ngram"],
    "nemotron_h": ["nemotron_h"],
    "lfm2": ["lfm2_moe"],
    "gemma4": ["gemma4_text", "gemma4"],
}
COVERED = [a for family in FAMILIES.values() for a in family]
# The MoE model types left: muse_spark, which its block handler declines
# (Metal-only kernels), and prism_hadamard_qwen35, a weight pack of qwen3_5
# that mlx_moe.checkpoints.synthetic cannot write.
NOT_EXPERT = ["muse_spark", "prism_hadamard_qwen35"]
CASES = [(a, None) for a in COVERED] + [(f[0], 4) for f in FAMILIES.values()]
LAUNCHES = 3
SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)


def test_every_moe_architecture_in_mlx_lm_is_accounted_for():
    assert sorted(moe_model_types()) == sorted(COVERED + NOT_EXPERT)


def _runs(paths, prompt, **options):
    return [{"checkpoint": str(p), "strategy": "expert", "inputs": INPUTS, "prompt": prompt,
             "max_tokens": MAX_TOKENS, **options} for p in paths]


def _assert_ranks_match_single_process(outs, paths, bits, attention_split=None):
    """Each rank's logits and greedy text against single-process mlx-lm;
    `attention_split(path)`: whether the long input's attention is split."""
    prompt = oracle.chat_prompt(paths[0])
    for i, (path, b) in enumerate(zip(paths, bits)):
        want = [oracle.last_logits(path, ids) for ids in INPUTS]
        text = oracle.greedy_text(path, prompt, MAX_TOKENS)
        for rank, out in enumerate(outs):
            r = out[i]
            assert r["strategy"] == "expert", (path.name, r["plan"])
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= TOLERANCE[b], (path.name, rank)
            assert r["text"] == text, (path.name, rank)
            # One combine per MoE layer, whatever the block handler.
            assert r["decode_collectives"] == [r["moe_layers"]] * len(INPUTS), path.name
            if attention_split is not None:
                # The 40-token input gathers the split attention: more collectives.
                split = r["collectives"][1] > r["collectives"][0]
                assert split == attention_split(path), (path.name, r["collectives"])


@pytest.mark.parametrize("part", range(LAUNCHES))
def test_two_ranks_match_single_process(checkpoint, part, tmp_path):
    cases = CASES[part::LAUNCHES]
    paths = [checkpoint(arch, quantize=bits, **SPEC) for arch, bits in cases]
    # One tokenizer, so one prompt, for all synthetic checkpoints.
    runs = _runs(paths, oracle.chat_prompt(paths[0]))
    outs = launch("sharded_worker", {"runs": runs}, 2, tmp_path)
    # deepseek_v41 computes attention its own way, which stays whole; a GPU
    # keeps a 40-token input's attention whole too.
    _assert_ranks_match_single_process(outs, paths, [bits for _, bits in cases],
                                       attention_split=lambda p: attention_gathers(len(INPUTS[1])) > 0
                                       and not p.name.startswith("deepseek_v41-"))


@pytest.mark.parametrize("path", ["masked", "gathered"])
@pytest.mark.parametrize("arch,bits", CASES, ids=[f"{a}-{b or 32}" for a, b in CASES])
def test_three_simulated_ranks_match_single_process(checkpoint, arch, bits, path, monkeypatch):
    # Both ways LocalExperts computes (on real ranks the device picks one),
    # over 8 experts on 3 ranks: 3/3/2, uneven where the real-rank test is even.
    monkeypatch.setattr(expert, "GATHER_MIN_TOKENS", 1 if path == "gathered" else 10**9)
    model = oracle._load(str(checkpoint(arch, quantize=bits, **SPEC)))[0]
    if bits:
        switches = [m for _, m in model.named_modules() if isinstance(m, SWITCH_LINEARS)]
        assert switches and all(isinstance(m, QuantizedSwitchLinear) for m in switches)
    together, p = combined(model, 3)
    assert [hi - lo for lo, hi in p.moe_layers[0].ranges] == [3, 3, 2]
    assert max_logit_diff(model, together, INPUTS) <= TOLERANCE[bits]


@pytest.mark.parametrize("arch", ["longcat_flash", "kimi_k3", "nemotron_h"])
def test_the_generic_handler_alone_would_be_wrong(checkpoint, arch, monkeypatch):
    """What each architecture-specific handler fixes is a real error."""
    model = oracle._load(str(checkpoint(arch, **SPEC)))[0]
    generic = [h for h in expert._HANDLERS if h.name == "generic"]
    monkeypatch.setattr(expert, "_HANDLERS", generic)
    together, _ = combined(model, 2)
    assert max_logit_diff(model, together, INPUTS) > 0.1


def test_step3p5_share_expert_is_computed_once(checkpoint):
    model = oracle._load(str(checkpoint("step3p5", **SPEC)))[0]
    p = plan(model, LocalGroup(2), "expert")
    assert all(l.shared == ("share_expert",) for l in p.moe_layers)


def test_declined_blocks_fall_back_to_pipeline(checkpoint):
    model = oracle._load(str(checkpoint("muse_spark", **SPEC)))[0]
    with pytest.raises(PlanError, match="Metal-only"):
        plan(model, LocalGroup(2), "expert")
    assert plan(model, LocalGroup(2), "auto").strategy == "pipeline"


def test_uneven_expert_weights_on_three_ranks(checkpoint, tmp_path):
    """A 512 GB and two 192 GB Macs: rank 0 takes half the experts. Shared
    experts, grouped routing and identity experts each go to one rank."""
    paths = [checkpoint(a, **SPEC) for a in ("deepseek_v3", "longcat_flash")]
    runs = _runs(paths, oracle.chat_prompt(paths[0]), expert_weights=[2, 1, 1])
    outs = launch("sharded_worker", {"runs": runs}, 3, tmp_path)

    _assert_ranks_match_single_process(outs, paths, [None] * len(paths))
    for i in range(len(paths)):
        for rank, out in enumerate(outs):
            r = out[i]
            assert all(ranges == [[0, 4], [4, 6], [6, 8]] for ranges in r["ranges"]), r["plan"]
            assert all(cell in r["plan"] for cell in ("0-3", "4-5", "6-7")), r["plan"]
            # Each rank's expert bytes follow its share.
            lo, hi = r["ranges"][0][rank]
            share = r["param_bytes"]["experts_local"] / r["param_bytes"]["experts_total"]
            assert share == pytest.approx((hi - lo) / 8), (rank, r["param_bytes"])
    # deepseek_v3's shared expert goes to a rank with the fewest experts.
    assert "6-7+sh" in outs[0][0]["plan"], outs[0][0]["plan"]
