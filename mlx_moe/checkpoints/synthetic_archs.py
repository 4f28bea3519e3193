"""The configs `synthesize` writes: mlx-lm's dense Qwen3 and Llama and its
MoE architectures but the DeepSeek lineage (synthetic_deepseek.py), each as
small as it goes."""


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def _common(layers, hidden, vocab):
    """Keys every supported architecture shares. Head and MLP sizes are
    multiples of 64 so 4-bit (group 32) weights still split evenly in two."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": max(16, hidden // 4),
        "intermediate_size": _round_up(2 * hidden, 64),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
    }


def _qwen3_moe(layers, hidden, experts, top_k, vocab):
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        **_common(layers, hidden, vocab),
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": _round_up(hidden, 64),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def _qwen3(layers, hidden, experts, top_k, vocab):
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **_common(layers, hidden, vocab),
    }


def _llama(layers, hidden, experts, top_k, vocab):
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **_common(layers, hidden, vocab),
    }


# Every other MoE architecture in mlx-lm, each as small as it goes while
# still exercising what expert parallel must get right: shared experts,
# grouped (n_group/topk_group) routing, dense-first layers, hybrid (SSM /
# linear-attention) layer stacks. Builders
# take (layers, hidden, experts, top_k, vocab); a few need a minimum of
# layers, noted where they set it.


def _moe_sizes(hidden):
    return {"moe_intermediate_size": _round_up(hidden, 64)}


def _grouped(experts):
    """Grouped routing over groups of two experts, half the groups picked per
    token, so a token's experts can sit on different ranks (were each rank
    one group, they never would)."""
    return {"n_group": max(1, experts // 2), "topk_group": max(1, experts // 4)}


def _alternating(layers, even, odd):
    return [even if i % 2 == 0 else odd for i in range(layers)]


def _qwen2_moe(layers, hidden, experts, top_k, vocab):
    # A shared expert behind a sigmoid gate.
    return {"model_type": "qwen2_moe", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "num_experts": experts, "num_experts_per_tok": top_k,
            "shared_expert_intermediate_size": 2 * _round_up(hidden, 64)}


def _qwen3_next_text(layers, hidden, experts, top_k, vocab):
    # Gated-delta linear attention in every other layer, a gated shared expert.
    return {**_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": experts,
            "num_experts_per_tok": top_k, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "shared_expert_intermediate_size": _round_up(hidden, 64),
            "partial_rotary_factor": 0.5, "norm_topk_prob": True, "full_attention_interval": 2}


def _qwen3_next(layers, hidden, experts, top_k, vocab):
    return {"model_type": "qwen3_next", **_qwen3_next_text(layers, hidden, experts, top_k, vocab)}


def _text_wrapped(model_type, text_type, text, **top):
    """A vision-language checkpoint that holds the language model in text_config."""
    return {"model_type": model_type, "text_config": {**text, "model_type": text_type}, **top}


def _qwen3_5(layers, hidden, experts, top_k, vocab):
    text = _qwen3_next_text(layers, hidden, experts, top_k, vocab)
    return _text_wrapped("qwen3_5", "qwen3_5_text", text, vocab_size=vocab,
                         tie_word_embeddings=False)


def _qwen3_5_moe(layers, hidden, experts, top_k, vocab):
    text = _qwen3_next_text(layers, hidden, experts, top_k, vocab)
    return _text_wrapped("qwen3_5_moe", "qwen3_5_moe_text", text, vocab_size=vocab,
                         tie_word_embeddings=False)


def _qwen3_vl_moe(layers, hidden, experts, top_k, vocab):
    text = _qwen3_moe(layers, hidden, experts, top_k, vocab)
    return _text_wrapped("qwen3_vl_moe", "qwen3_vl_moe_text", text)


def _mixtral(layers, hidden, experts, top_k, vocab):
    return {"model_type": "mixtral", **_common(layers, hidden, vocab),
            "num_local_experts": experts, "num_experts_per_tok": top_k}


def _phimoe(layers, hidden, experts, top_k, vocab):
    # Sparsemixer routing.
    return {"model_type": "phimoe", **_common(layers, hidden, vocab), "num_local_experts": experts,
            "num_experts_per_tok": top_k, "original_max_position_embeddings": 4096}


def _phixtral(layers, hidden, experts, top_k, vocab):
    # SwitchMLP experts with biases.
    return {"model_type": "phixtral", "num_vocab": vocab, "model_dim": hidden, "num_heads": 4,
            "num_layers": layers, "rotary_dim": 8, "num_experts_per_tok": top_k,
            "num_local_experts": experts}


def _olmoe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "olmoe", **_common(layers, hidden, vocab), "num_experts": experts,
            "num_experts_per_tok": top_k, "norm_topk_prob": True}


def _granite(hidden):
    return {"intermediate_size": _round_up(hidden, 64), "logits_scaling": 2.0,
            "attention_multiplier": 0.25, "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5, "attention_bias": False}


def _granitemoe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "granitemoe", **_common(layers, hidden, vocab), **_granite(hidden),
            "num_local_experts": experts, "num_experts_per_tok": top_k}


def _granitemoehybrid(layers, hidden, experts, top_k, vocab):
    # Mamba2 and attention layers, each with an MoE block and a shared MLP.
    return {"model_type": "granitemoehybrid", **_common(layers, hidden, vocab), **_granite(hidden),
            "layer_types": _alternating(layers, "mamba", "attention"),
            "num_local_experts": experts, "num_experts_per_tok": top_k,
            "shared_intermediate_size": _round_up(hidden, 64), "mamba_n_heads": 4,
            "mamba_d_head": 32, "mamba_proj_bias": False, "mamba_d_state": 16,
            "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True}


def _gpt_oss(layers, hidden, experts, top_k, vocab):
    # Experts with biases and a clamped SwiGLU, sliding and full attention.
    return {"model_type": "gpt_oss", **_common(layers, hidden, vocab),
            "intermediate_size": _round_up(hidden, 64), "num_local_experts": experts,
            "num_experts_per_tok": top_k, "sliding_window": 8,
            "layer_types": _alternating(layers, "sliding_attention", "full_attention")}


def _llama4(layers, hidden, experts, top_k, vocab):
    # MoE in every other layer, top-1 with the score applied to the input;
    # the model reads the cache of layer 3, so it needs at least 4 layers.
    text = {**_common(max(layers, 4), hidden, vocab), "attention_bias": False,
            "attention_chunk_size": 8192, "interleave_moe_layer_step": 2,
            "intermediate_size": _round_up(hidden, 64),
            "intermediate_size_mlp": 2 * _round_up(hidden, 64), "num_experts_per_tok": 1,
            "num_local_experts": experts, "rope_scaling": None, "use_qk_norm": True}
    return _text_wrapped("llama4", "llama4_text", text)


def _minimax(layers, hidden, experts, top_k, vocab):
    return {"model_type": "minimax", **_common(layers, hidden, vocab),
            "intermediate_size": _round_up(hidden, 64), "num_experts_per_tok": top_k,
            "num_local_experts": experts, "shared_intermediate_size": 0, "rotary_dim": 8}


def _minimax_m3_vl(layers, hidden, experts, top_k, vocab):
    text = {**_common(layers, hidden, vocab), "intermediate_size": _round_up(hidden, 64),
            "dense_intermediate_size": 2 * _round_up(hidden, 64),
            "shared_intermediate_size": _round_up(hidden, 64), "num_local_experts": experts,
            "num_experts_per_tok": top_k, "moe_layer_freq": [int(i > 0) for i in range(layers)]}
    return {"model_type": "minimax_m3_vl", "text_config": text}


def _ernie4_5_moe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "ernie4_5_moe", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "use_bias": False, "moe_num_experts": experts, "moe_layer_start_index": 1,
            "moe_k": top_k, "moe_layer_interval": 1, "moe_num_shared_experts": 1}


def _hunyuan(layers, hidden, experts, top_k, vocab):
    return {"model_type": "hunyuan", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "attention_bias": False, "moe_topk": top_k, "num_experts": experts,
            "num_shared_expert": 1, "use_mixed_mlp_moe": True, "use_qk_norm": True,
            "use_cla": False, "cla_share_factor": 2,
            "rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"}}


def _exaone_moe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "exaone_moe", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "num_experts": experts, "num_experts_per_tok": top_k,
            "num_shared_experts": 1, "sliding_window": 8,
            "layer_types": _alternating(layers, "sliding_attention", "full_attention"),
            "is_moe_layer": [i > 0 for i in range(layers)]}


def _lfm2_moe(layers, hidden, experts, top_k, vocab):
    # Short convolutions and attention; sigmoid routing with a selection bias.
    return {"model_type": "lfm2_moe", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
            "use_expert_bias": True, "num_dense_layers": 1, "norm_eps": 1e-5,
            "conv_bias": False, "conv_L_cache": 3, "routed_scaling_factor": 1.5,
            "layer_types": _alternating(layers, "conv", "full_attention")}


def _afmoe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "afmoe", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "num_experts": experts, "num_experts_per_tok": top_k,
            "num_shared_experts": 1, "num_dense_layers": 1, "sliding_window": 8,
            "layer_types": _alternating(layers, "sliding_attention", "full_attention")}


def _jamba(layers, hidden, experts, top_k, vocab):
    # Mamba and attention layers, MoE in every other one.
    return {"model_type": "jamba", **_common(layers, hidden, vocab),
            "intermediate_size": _round_up(hidden, 64), "attn_layer_offset": 1,
            "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2,
            "mamba_d_conv": 4, "mamba_d_state": 16, "mamba_expand": 2,
            "num_experts": experts, "num_experts_per_tok": top_k}


def _nemotron_h(layers, hidden, experts, top_k, vocab):
    # Mamba2 / attention / MoE blocks; latent experts whose sum goes through
    # a projection with a bias.
    return {"model_type": "nemotron_h", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "attention_bias": False, "mamba_num_heads": 4,
            "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16,
            "conv_kernel": 4, "n_groups": 2, "mlp_bias": True, "layer_norm_epsilon": 1e-5,
            "use_bias": False, "use_conv_bias": True,
            "hybrid_override_pattern": list(("M*E" * layers)[:layers]),
            "moe_shared_expert_intermediate_size": _round_up(hidden, 64), "moe_latent_size": 32,
            "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": top_k,
            "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def _step3p5(layers, hidden, experts, top_k, vocab):
    # Its shared expert is called `share_expert`.
    return {"model_type": "step3p5", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "num_attention_groups": 2, "sliding_window": 8, "moe_num_experts": experts,
            "moe_top_k": top_k, "share_expert_dim": _round_up(hidden, 64)}


def _klear(layers, hidden, experts, top_k, vocab):
    # The shared expert is mixed in by learned coefficients.
    return {"model_type": "Klear", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "attention_bias": False, "mlp_only_layers": [0], "num_experts": experts,
            "num_experts_per_tok": top_k, "decoder_sparse_step": 1, "n_shared_experts": 1,
            "norm_topk_prob": True}


def _laguna(layers, hidden, experts, top_k, vocab):
    return {"model_type": "laguna", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "num_experts": experts, "num_experts_per_tok": top_k,
            "shared_expert_intermediate_size": _round_up(hidden, 64),
            "moe_routed_scaling_factor": 2.0, "sliding_window": 8}


def _mellum(layers, hidden, experts, top_k, vocab):
    kinds = ("sliding_attention", "full_attention")
    return {"model_type": "mellum", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
            "sliding_window": 8, "layer_types": _alternating(layers, *kinds),
            "rope_parameters": {k: {"rope_theta": 10000.0, "rope_type": "default"} for k in kinds}}


def _mimo_v2_flash(layers, hidden, experts, top_k, vocab):
    return {"model_type": "mimo_v2_flash", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "num_experts_per_tok": top_k,
            "hybrid_layer_pattern": [i % 2 for i in range(layers)],
            "moe_layer_freq": [int(i > 0) for i in range(layers)],
            "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
            "sliding_window_size": 8, "n_shared_experts": None, "n_routed_experts": experts,
            "routed_scaling_factor": None, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "norm_topk_prob": True, "layernorm_epsilon": 1e-5, "swa_rope_theta": 10000.0,
            "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "v_head_dim": 16,
            "swa_head_dim": 16, "swa_v_head_dim": 16, "partial_rotary_factor": 1}


def _gemma4_text(layers, hidden, experts, top_k, vocab):
    # The MoE runs next to a dense MLP in every layer, its router outside the experts.
    return {"model_type": "gemma4_text", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            "global_head_dim": 32, "vocab_size_per_layer_input": vocab,
            "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0, "sliding_window": 8,
            "sliding_window_pattern": 2, "enable_moe_block": True, "num_experts": experts,
            "top_k_experts": top_k}


def _gemma4(layers, hidden, experts, top_k, vocab):
    return {"model_type": "gemma4", "vocab_size": vocab,
            "text_config": _gemma4_text(layers, hidden, experts, top_k, vocab)}


def _muse_spark(layers, hidden, experts, top_k, vocab):
    # Experts at a compressed width between projections; Metal kernels only.
    kinds = ("sliding_attention", "full_attention")
    text = {**_common(layers, hidden, vocab), **_moe_sizes(hidden), "post_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "layer_rope_theta": [10000.0] * layers, "layer_types": _alternating(layers, *kinds),
            "sliding_window": 8, "final_logit_softcapping": 30.0, "output_multiplier": 1.0,
            "num_local_experts": experts, "num_experts_per_tok": top_k, "moe_hidden_size": 32}
    # transformers checks the audio encoder width against the text model.
    return {"model_type": "muse_spark", "text_config": text,
            "audio_config": {"out_hidden_size": hidden}}


ARCHS = {
    "qwen3_moe": _qwen3_moe, "qwen3": _qwen3, "llama": _llama, "qwen2_moe": _qwen2_moe,
    "qwen3_next": _qwen3_next, "qwen3_5": _qwen3_5, "qwen3_5_moe": _qwen3_5_moe,
    "qwen3_vl_moe": _qwen3_vl_moe, "mixtral": _mixtral, "phimoe": _phimoe, "phixtral": _phixtral,
    "olmoe": _olmoe, "granitemoe": _granitemoe, "granitemoehybrid": _granitemoehybrid,
    "gpt_oss": _gpt_oss, "llama4": _llama4, "minimax": _minimax, "minimax_m3_vl": _minimax_m3_vl,
    "ernie4_5_moe": _ernie4_5_moe, "hunyuan": _hunyuan, "exaone_moe": _exaone_moe,
    "lfm2_moe": _lfm2_moe, "afmoe": _afmoe, "jamba": _jamba, "nemotron_h": _nemotron_h,
    "step3p5": _step3p5, "Klear": _klear, "laguna": _laguna, "mellum": _mellum,
    "mimo_v2_flash": _mimo_v2_flash, "gemma4_text": _gemma4_text, "gemma4": _gemma4,
    "muse_spark": _muse_spark,
}
DENSE_ARCHS = {"qwen3", "llama"}
