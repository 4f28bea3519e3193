"""The configs `synthesize` writes for the DeepSeek lineage: routed plus
shared experts, dense first layers, grouped or biased routing, latent (MLA)
attention; DeepSeek itself and the models built on its design."""

from .synthetic_archs import _common, _grouped, _moe_sizes, _round_up, _text_wrapped


def _mla():
    """Multi-head latent attention (deepseek v2/v3 style), smallest dims."""
    return {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 16, "v_head_dim": 16}


def _deepseek_family(layers, hidden, experts, top_k, vocab):
    # One shared expert, the first layer dense.
    return {**_common(layers, hidden, vocab), **_moe_sizes(hidden), "num_key_value_heads": 4,
            "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": top_k,
            "first_k_dense_replace": 1, "moe_layer_freq": 1}


def _deepseek(layers, hidden, experts, top_k, vocab):
    return {"model_type": "deepseek", **_deepseek_family(layers, hidden, experts, top_k, vocab)}


def _deepseek_v2(layers, hidden, experts, top_k, vocab):
    return {"model_type": "deepseek_v2", **_deepseek_family(layers, hidden, experts, top_k, vocab),
            **_mla(), **_grouped(experts), "topk_method": "group_limited_greedy",
            "routed_scaling_factor": 1.5, "rope_scaling": {"factor": 1.0, "mscale_all_dim": 0}}


def _deepseek_v3(layers, hidden, experts, top_k, vocab, model_type="deepseek_v3"):
    # Sigmoid scores with a selection bias, grouped top-k (noaux_tc).
    return {"model_type": model_type, **_deepseek_family(layers, hidden, experts, top_k, vocab),
            **_mla(), **_grouped(experts), "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def _deepseek_v32(layers, hidden, experts, top_k, vocab, model_type="deepseek_v32"):
    # The lightning indexer picks the attended keys.
    return {**_deepseek_v3(layers, hidden, experts, top_k, vocab, model_type),
            "index_head_dim": 32, "index_n_heads": 2, "index_topk": 8}


def _glm_moe_dsa(layers, hidden, experts, top_k, vocab):
    return {**_deepseek_v32(layers, hidden, experts, top_k, vocab, "glm_moe_dsa"),
            "attention_bias": False,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}


def _deepseek_v41(layers, hidden, experts, top_k, vocab):
    # Hyper-connections, sliding-window attention with grouped output.
    return {"model_type": "deepseek_v41", "vocab_size": vocab, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "head_dim": 32,
            "q_lora_rank": 32, "qk_rope_head_dim": 16, "o_groups": 2, "o_lora_rank": 32,
            **_moe_sizes(hidden), "n_routed_experts": experts, "num_experts_per_tok": top_k,
            "sliding_window": 8, "rms_norm_eps": 1e-6, "hc_mult": 2, "hc_sinkhorn_iters": 4,
            "max_position_embeddings": 32768}


def _kimi_k25(layers, hidden, experts, top_k, vocab):
    text = _deepseek_v3(layers, hidden, experts, top_k, vocab)
    return _text_wrapped("kimi_k25", "kimi_k2", text, vocab_size=vocab, tie_word_embeddings=False)


def _kimi_vl(layers, hidden, experts, top_k, vocab):
    text = _deepseek_v3(layers, hidden, experts, top_k, vocab)
    return _text_wrapped("kimi_vl", "deepseek_v3", text, vocab_size=vocab)


def _kimi_linear_text(layers, hidden, experts, top_k, vocab):
    # Kimi delta attention in every other layer, grouped sigmoid routing.
    return {**_common(layers, hidden, vocab), **_mla(), **_moe_sizes(hidden), "q_lora_rank": None,
            "num_key_value_heads": 4,
            "linear_attn_config": {"kda_layers": [i + 1 for i in range(0, layers, 2)],
                                   "full_attn_layers": [i + 1 for i in range(1, layers, 2)],
                                   "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
            "num_experts": experts, "num_experts_per_token": top_k, "num_shared_experts": 1,
            "first_k_dense_replace": 1, "num_expert_group": max(1, experts // 2),
            "topk_group": max(1, experts // 4), "routed_scaling_factor": 2.5}


def _kimi_linear(layers, hidden, experts, top_k, vocab):
    return {"model_type": "kimi_linear", **_kimi_linear_text(layers, hidden, experts, top_k, vocab),
            "model_max_length": 32768}


def _kimi_k3(layers, hidden, experts, top_k, vocab):
    # Latent experts whose sum is RMS-normed inside the block.
    text = {**_kimi_linear_text(layers, hidden, experts, top_k, vocab),
            "routed_expert_hidden_size": 32, "latent_moe_use_norm": True}
    return _text_wrapped("kimi_k3", "kimi_k3_text", text)


def _glm4_moe(layers, hidden, experts, top_k, vocab, model_type="glm4_moe"):
    return {"model_type": model_type, **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "norm_topk_prob": True, "n_shared_experts": 1,
            "n_routed_experts": experts, "routed_scaling_factor": 2.5,
            "num_experts_per_tok": top_k, "first_k_dense_replace": 1, "rope_scaling": None,
            "use_qk_norm": True, "attention_bias": True, "partial_rotary_factor": 0.5}


def _solar_open(layers, hidden, experts, top_k, vocab):
    return _glm4_moe(layers, hidden, experts, top_k, vocab, "solar_open")


def _glm4_moe_lite(layers, hidden, experts, top_k, vocab):
    return {"model_type": "glm4_moe_lite", **_mla(), **_grouped(experts),
            **_deepseek_family(layers, hidden, experts, top_k, vocab), "routed_scaling_factor": 1.8}


def _dots1(layers, hidden, experts, top_k, vocab):
    return {"model_type": "dots1", **_common(layers, hidden, vocab), **_moe_sizes(hidden),
            **_grouped(experts), "first_k_dense_replace": 1, "n_routed_experts": experts,
            "n_shared_experts": 1, "norm_topk_prob": True, "num_experts_per_tok": top_k,
            "routed_scaling_factor": 2.5, "scoring_func": "noaux_tc"}


def _bailing(layers, hidden, experts, top_k, vocab):
    return {**_common(layers, hidden, vocab), **_moe_sizes(hidden), **_grouped(experts),
            "num_experts": experts, "num_shared_experts": 1, "norm_topk_prob": True,
            "num_experts_per_tok": top_k, "first_k_dense_replace": 1,
            "moe_router_enable_expert_bias": True, "score_function": "sigmoid",
            "routed_scaling_factor": 2.5}


def _bailing_moe(layers, hidden, experts, top_k, vocab):
    return {"model_type": "bailing_moe", **_bailing(layers, hidden, experts, top_k, vocab),
            "use_qk_norm": True}


def _bailing_moe_linear(layers, hidden, experts, top_k, vocab):
    # Linear attention in groups of two layers.
    return {"model_type": "bailing_moe_linear", **_bailing(layers, hidden, experts, top_k, vocab),
            "layer_group_size": 2, "group_norm_size": 1, "use_qk_norm": True}


def _bailing_hybrid(layers, hidden, experts, top_k, vocab):
    return {"model_type": "bailing_hybrid", **_bailing(layers, hidden, experts, top_k, vocab),
            **_mla(), "layer_group_size": 2, "group_norm_size": 1}


def _bailing_moe_v3(layers, hidden, experts, top_k, vocab):
    return {"model_type": "bailing_moe_v3", **_bailing(layers, hidden, experts, top_k, vocab),
            **_mla(), "moe_shared_expert_intermediate_size": _round_up(hidden, 64),
            "layer_group_size": 2}


def _longcat_flash(layers, hidden, experts, top_k, vocab):
    # Two identity ("zero") experts next to the real ones.
    return {"model_type": "longcat_flash", **_common(layers, hidden, vocab), **_mla(),
            "attention_method": "MLA", "zero_expert_type": "identity",
            "ffn_hidden_size": 2 * _round_up(hidden, 64), "moe_topk": top_k,
            "expert_ffn_hidden_size": _round_up(hidden, 64), "n_routed_experts": experts,
            "zero_expert_num": 2, "num_layers": layers, "routed_scaling_factor": 2.0,
            "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "attention_bias": False}


def _longcat_flash_ngram(layers, hidden, experts, top_k, vocab):
    return {**_longcat_flash(layers, hidden, experts, top_k, vocab),
            "model_type": "longcat_flash_ngram", "ngram_vocab_size_ratio": 2,
            "emb_neighbor_num": 2, "emb_split_num": 2}


def _mistral4(layers, hidden, experts, top_k, vocab):
    return {"model_type": "mistral4", **_deepseek_family(layers, hidden, experts, top_k, vocab),
            **_mla(), **_grouped(experts), "routed_scaling_factor": 1.0, "norm_topk_prob": True,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "factor": 1.0,
                                "llama_4_scaling_beta": 0.1,
                                "original_max_position_embeddings": 8192}}


def _mistral3(layers, hidden, experts, top_k, vocab):
    text = _mistral4(layers, hidden, experts, top_k, vocab)
    return {"model_type": "mistral3", "text_config": text}


ARCHS = {
    "deepseek": _deepseek, "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3,
    "deepseek_v32": _deepseek_v32, "glm_moe_dsa": _glm_moe_dsa, "deepseek_v41": _deepseek_v41,
    "kimi_k25": _kimi_k25, "kimi_vl": _kimi_vl, "kimi_linear": _kimi_linear, "kimi_k3": _kimi_k3,
    "glm4_moe": _glm4_moe, "solar_open": _solar_open, "glm4_moe_lite": _glm4_moe_lite,
    "dots1": _dots1, "bailing_moe": _bailing_moe, "bailing_moe_linear": _bailing_moe_linear,
    "bailing_hybrid": _bailing_hybrid, "bailing_moe_v3": _bailing_moe_v3,
    "longcat_flash": _longcat_flash, "longcat_flash_ngram": _longcat_flash_ngram,
    "mistral4": _mistral4, "mistral3": _mistral3,
}
