"""Small, deterministic checkpoints in mlx-lm's on-disk format.

The model is built from mlx-lm's own classes and saved with mlx-lm's own
helpers, so `mlx_lm.load(path)` returns a real model and tokenizer without any
download. Weights are rescaled so that logits are spread out: greedy choices
must not flip on the float noise that separates a distributed run from a
single-process one.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# Bump when the output for the same arguments changes, so cached checkpoints
# in existing directories are rebuilt.
FORMAT_VERSION = 1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB = 512

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tokenizer. It only has to be long enough to yield
# ~512 merges; keeping it in the module makes the tokenizer reproducible.
CORPUS = """\
The river ran quietly through the valley, past the old mill and the stone bridge
where children used to gather in the summer evenings. Nobody remembered who had
built the bridge, but everyone agreed that it was older than the village itself.
In the spring the water rose and carried branches, leaves and sometimes a lost
boat down toward the sea, and the fishermen waited on the banks for it to calm.

A small library stood at the corner of the market square. Its shelves held books
about history, science, cooking, music and the weather, and the librarian knew
where every one of them belonged. Students came in the afternoon to read and to
write their reports, while older visitors preferred the quiet hours of the
morning, when the light through the tall windows was soft and warm.

Computers process information by following instructions written in programs.
A program is a sequence of steps: read a number, compare it with another, store
the result, and repeat until the work is done. Modern machines perform billions
of these steps every second, yet the ideas behind them are simple enough to be
explained with a pencil and a sheet of paper. Memory holds the data, the
processor transforms it, and the network moves it from one machine to another.

Language models predict the next word in a text. They are trained on large
collections of documents and learn which words tend to follow which others.
When a model is asked a question, it writes an answer one token at a time,
choosing each token from a probability distribution over its vocabulary. A
mixture of experts sends every token to a few specialised networks instead of
one large network, which saves computation while keeping the model capacity.

Hello! How are you today? I am fine, thank you. What would you like to talk
about? Tell me a story about a dragon, a king and a clever young girl who
solved a riddle that nobody else could answer. The weather is nice; let us go
for a walk in the park, then have some tea and cake at the cafe near the station.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear often.
"""


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


def _mla():
    """Multi-head latent attention (deepseek v2/v3 style), smallest dims."""
    return {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 16, "v_head_dim": 16}


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
    "qwen3_moe": _qwen3_moe, "qwen3": _qwen3, "llama": _llama,
    "qwen2_moe": _qwen2_moe, "qwen3_next": _qwen3_next, "qwen3_5": _qwen3_5,
    "qwen3_5_moe": _qwen3_5_moe, "qwen3_vl_moe": _qwen3_vl_moe, "mixtral": _mixtral,
    "phimoe": _phimoe, "phixtral": _phixtral, "olmoe": _olmoe, "granitemoe": _granitemoe,
    "granitemoehybrid": _granitemoehybrid, "deepseek": _deepseek, "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3, "deepseek_v32": _deepseek_v32, "glm_moe_dsa": _glm_moe_dsa,
    "deepseek_v41": _deepseek_v41, "kimi_k25": _kimi_k25, "kimi_vl": _kimi_vl,
    "kimi_linear": _kimi_linear, "kimi_k3": _kimi_k3, "glm4_moe": _glm4_moe,
    "solar_open": _solar_open, "glm4_moe_lite": _glm4_moe_lite, "gpt_oss": _gpt_oss,
    "llama4": _llama4, "minimax": _minimax, "minimax_m3_vl": _minimax_m3_vl,
    "ernie4_5_moe": _ernie4_5_moe, "dots1": _dots1, "bailing_moe": _bailing_moe,
    "bailing_moe_linear": _bailing_moe_linear, "bailing_hybrid": _bailing_hybrid,
    "bailing_moe_v3": _bailing_moe_v3, "hunyuan": _hunyuan, "exaone_moe": _exaone_moe,
    "lfm2_moe": _lfm2_moe, "afmoe": _afmoe, "jamba": _jamba, "nemotron_h": _nemotron_h,
    "step3p5": _step3p5, "longcat_flash": _longcat_flash,
    "longcat_flash_ngram": _longcat_flash_ngram, "mistral4": _mistral4, "mistral3": _mistral3,
    "Klear": _klear, "laguna": _laguna, "mellum": _mellum, "mimo_v2_flash": _mimo_v2_flash,
    "gemma4_text": _gemma4_text, "gemma4": _gemma4, "muse_spark": _muse_spark,
}
DENSE_ARCHS = {"qwen3", "llama"}


def _train_tokenizer(vocab):
    # tokenizers/transformers/mlx_lm are imported where used: they are slow to
    # import and a CLI importing this module for --help should not pay for it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text encodes and round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return tok


def _save_tokenizer(tok, path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


# Multipliers on mlx's default init (uniform +-1/sqrt(fan_in) for linears,
# N(0, 1/hidden) for embeddings). The default gives near-uniform logits and
# blocks that barely touch the residual stream; these make the layers matter,
# routing decisive and the next-token choice clear.
EMBED_STD = 1.0  # embeddings: unit std, like the normalised stream
# An embedding that is also the head (hunyuan, lfm2_moe): at unit std the
# current token's own logit (|e|^2) outweighs the rest and greedy decoding
# repeats it forever.
TIED_EMBED_STD = 0.25
BODY_SCALE = 3.0**0.5  # attention/MLP linears: variance preserving (std 1/sqrt(fan_in))
ROUTER_SCALE = 8.0  # router logits std ~4.6: top-k choices far from ties
LM_HEAD_SCALE = 8.0  # logits std ~4.6


def _is_router(name, p, hidden, num_experts):
    """A router: a [>= experts, hidden] weight under a `gate` or `router`
    module (not a gate projection; longcat's also scores identity experts)."""
    parts = name.split(".")
    return (p.ndim == 2 and p.shape[1] == hidden and p.shape[0] >= num_experts
            and ("gate" in parts or "router" in parts))


def _rescale(model, hidden, vocab, num_experts):
    embeddings = {
        f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    flat = tree_flatten(model.parameters())
    head = any(p.ndim == 2 and p.shape == (vocab, hidden) and n not in embeddings for n, p in flat)
    params = []
    for name, p in flat:
        if name in embeddings:
            scale = (EMBED_STD if head else TIED_EMBED_STD) * hidden**0.5
        elif p.ndim == 2 and p.shape == (vocab, hidden):
            scale = LM_HEAD_SCALE
        elif num_experts and _is_router(name, p, hidden, num_experts):
            scale = ROUTER_SCALE
        elif "norm" in name:  # RMSNorm weights stay at 1
            scale = 1.0
        else:
            scale = BODY_SCALE
        params.append((name, p * scale))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def _skew_routers(model, hidden, num_experts, skew):
    """Make low expert ids popular: every embedding gets a constant first
    feature, which the residual stream carries through the layers, and each
    router reads it with a weight falling from +skew to -skew over the
    experts, a bias toward the first ones at every layer."""
    flat = tree_flatten(model.parameters())
    params = []
    for name, p in flat:
        if isinstance(p, mx.array) and p.ndim == 2 and name.endswith("embed_tokens.weight"):
            p = p.at[:, 0].add(-p[:, 0] + 3 * p.std())
        elif num_experts and _is_router(name, p, hidden, num_experts):
            profile = mx.linspace(skew, -skew, p.shape[0]) * p.std() * hidden**0.5
            p = p.at[:, 0].add(-p[:, 0] + profile)
        params.append((name, p))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def _write(path, config, quantize, seed, hidden, vocab, num_experts, router_skew=0.0):
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)  # before construction: the init draws the weights
    model = model_class(args_class.from_dict(config))
    _rescale(model, hidden, vocab, num_experts)
    if router_skew:
        _skew_routers(model, hidden, num_experts, router_skew)
    if quantize == 4:
        # quantize_model prints a bits-per-weight line; keep stdout for the CLI.
        with contextlib.redirect_stdout(sys.stderr):
            model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model(path, model)
    save_config(config, path / "config.json")


def _is_complete(path, meta):
    marker = path / "synthetic.json"
    try:
        return json.loads(marker.read_text()) == meta
    except (OSError, ValueError):
        return False


def synthesize(
    path,
    arch="qwen3_moe",
    *,
    layers=4,
    hidden=64,
    experts=8,
    top_k=2,
    quantize=None,
    seed=0,
    vocab=None,
    overrides=None,
    router_skew=0.0,
    layout="mlx",
) -> Path:
    """Write (or reuse) a synthetic checkpoint at `path` and return the path.

    `quantize` is None (float32) or 4 (4-bit affine, group size 32, via
    mlx-lm's own quantization). `vocab` is the BPE target size (default 512);
    `overrides` updates the generated config last. `router_skew` > 0
    makes the routers favour low expert ids (to study expert placement).
    `layout="hf"` writes the experts one tensor each, as Hugging Face
    checkpoints do, over several files (float32 only; see hf_layout).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if quantize not in (None, 4):
        raise ValueError(f"quantize must be None or 4, got {quantize!r}")
    if layout not in ("mlx", "hf") or (layout == "hf" and quantize):
        raise ValueError(f"layout must be 'mlx' or (float32 only) 'hf', got {layout!r}")
    if quantize and hidden % 64:
        # mlx-lm quantizes the qwen3_moe router with group size 64.
        raise ValueError(f"4-bit needs hidden to be a multiple of 64, got {hidden}")
    path = Path(path)
    meta = {
        "version": FORMAT_VERSION,
        "arch": arch,
        "layers": layers,
        "hidden": hidden,
        "experts": experts,
        "top_k": top_k,
        "quantize": quantize,
        "seed": seed,
        "vocab": vocab,
        "overrides": overrides or {},
    }
    if router_skew:
        meta["router_skew"] = router_skew
    if layout != "mlx":
        meta["layout"] = layout
    # Round-trip through JSON so the comparison with the stored file is exact.
    meta = json.loads(json.dumps(meta))
    if _is_complete(path, meta):
        return path
    if path.exists() and any(path.iterdir()) and not (path / "synthetic.json").exists():
        raise FileExistsError(f"{path} is not empty and not a synthetic checkpoint")

    # Build in a sibling temp dir and rename it into place, so readers (or a
    # second process racing on the same path) never see a half-written one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        tok = _train_tokenizer(vocab or DEFAULT_VOCAB)
        _save_tokenizer(tok, tmp)
        config = ARCHS[arch](layers, hidden, experts, top_k, tok.get_vocab_size())
        config["eos_token_id"] = tok.token_to_id(EOS_TOKEN)
        config.update(overrides or {})
        num_experts = 0 if arch in DENSE_ARCHS else experts
        _write(tmp, config, quantize, seed, hidden, tok.get_vocab_size(), num_experts, router_skew)
        if layout == "hf":
            from .hf_layout import write_hf_layout

            write_hf_layout(tmp)
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        # A process racing on the same path may have finished meanwhile: keep
        # its identical checkpoint rather than pull it from under its readers.
        if _is_complete(path, meta):
            return path
        if path.exists():
            shutil.rmtree(path)  # an empty dir or our own stale checkpoint
        try:
            os.rename(tmp, path)
        except OSError:
            if not _is_complete(path, meta):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _disk_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mlx-moe synth",
        description="Write a small deterministic mlx-lm checkpoint.",
    )
    parser.add_argument("--arch", default="qwen3_moe", choices=sorted(ARCHS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--quantize", choices=["none", "4"], default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["mlx", "hf"], default="mlx",
                        help="hf: one tensor per expert over several files, as Hugging Face "
                             "checkpoints hold them (float32)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)

    path = synthesize(
        args.out,
        args.arch,
        layers=args.layers,
        hidden=args.hidden,
        experts=args.experts,
        top_k=args.top_k,
        quantize=None if args.quantize == "none" else int(args.quantize),
        seed=args.seed,
        layout=args.layout,
    )
    moe = "" if args.arch in DENSE_ARCHS else f", {args.experts} experts, top-{args.top_k}"
    print(path)
    print(
        f"{args.arch}: {args.layers} layers{moe}, "
        f"{'float32' if args.quantize == 'none' else '4-bit'}, "
        f"{_disk_bytes(path)} bytes on disk"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
