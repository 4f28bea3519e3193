"""A checkpoint as the cost model sees it, from config.json and the
safetensors headers alone: the mlx-lm model built lazily (its arrays are
never evaluated, so it costs no memory), its bytes by where they sit, the
kernel ops of one decode step and what each layer's KV cache holds, traced
from one lazy forward pass."""

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoints.checkpoint import LAYER, SAFETENSORS_DTYPES, mlx_dtype
from ..checkpoints.headers import CheckpointInfo
from ..parallel.expert import find_moe_blocks, top_k_of
from ..parallel.plan import PlanError, layers_path
from .profiles import GB


class _Stub:
    """What mlx-lm's quantization inference reads of a weight: its shape and dtype."""

    def __init__(self, t):
        self.shape, self.dtype = t.shape, mlx_dtype(t.dtype) or mx.float32


def build_model(info: CheckpointInfo) -> nn.Module:
    """The mlx-lm model of `info`, built the way mlx-lm's loader builds it
    (quantized per config.json and the headers) but never evaluated: its
    arrays stay unevaluated random-init graphs that hold no memory."""
    from mlx_lm.utils import _get_classes, infer_quant_config

    config = dict(info.config)
    if config.get("model_file"):
        raise PlanError(f"{info.source} builds its model from custom code ({config['model_file']}); "
                        "mlx-moe plan does not run it")
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise PlanError(f"mlx-lm cannot build {config.get('model_type')!r}: {e}") from e
    model = model_class(args_class.from_dict(config))
    quantization = config.get("quantization")
    if quantization:
        stubs = {k: _Stub(t) for k, t in info.tensors.items()}

        def predicate(path, module):
            if path in quantization:
                return quantization[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in stubs:
                return False
            return infer_quant_config(path, module, stubs)

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=predicate)
    return model


# Primitives that make a view of their input: no kernel runs for them.
VIEW_OPS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Transpose", "Slice", "StopGradient",
            "Flatten", "Unflatten", "AsStrided"}


def _count_ops(*arrays) -> int:
    """Ops that run a kernel in the graph that computes `arrays`."""
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        labels = re.findall(r'\[label ="(\w+)', Path(f.name).read_text())
    return sum(label not in VIEW_OPS for label in labels)


@dataclass
class KVLayer:
    per_token: int  # bytes per token of context
    cap: Optional[int]  # tokens kept (a sliding window); None: all
    fixed: int  # bytes that do not grow with context (recurrent state)
    heads: int  # KV heads: tensor parallel splits them, a latent (MLA) cache has 1

    def at(self, tokens: int) -> int:
        return self.per_token * (tokens if self.cap is None else min(tokens, self.cap)) + self.fixed


# Kernel ops per layer of the traced models (Qwen3-235B 89, DeepSeek-V3
# 102): the estimate for a model whose decode step cannot be traced.
OPS_PER_LAYER = 90


def _untraced(config: dict, layers: int, act_bytes: int) -> Tuple[int, List["KVLayer"]]:
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // (config.get("num_attention_heads") or 1)
    return OPS_PER_LAYER * layers, [KVLayer(2 * heads * head_dim * act_bytes, None, 0, heads)] * layers


def _flat_caches(cache) -> list:
    out = []
    for c in cache:
        out += _flat_caches(c.caches) if hasattr(c, "caches") else [c]
    return out


def trace_decode(model: nn.Module, act_bytes: int) -> Tuple[int, List[KVLayer]]:
    """Ops of one decode step and what each layer's cache stores per token,
    from one lazy forward pass: graphs and shapes only, nothing evaluated."""
    from mlx_lm.models.cache import make_prompt_cache

    params = [p for _, p in tree_flatten(model.parameters())]
    cache = make_prompt_cache(model)
    states = lambda: [a for c in _flat_caches(cache) for a in tree_flatten(c.state) if isinstance(a, mx.array)]
    first = [model(mx.array([[0]]), cache=cache), *states()]
    second = [model(mx.array([[0]]), cache=cache), *states()]
    # The second step's graph minus everything before it (the weights' init, the first step).
    ops = _count_ops(*params, *first, *second) - _count_ops(*params, *first)
    kv = []
    for per_layer in cache:
        layer = KVLayer(0, None, 0, 1)
        for c in _flat_caches([per_layer]):
            keys, values = getattr(c, "keys", None), getattr(c, "values", None)
            if isinstance(keys, mx.array) and isinstance(values, mx.array):
                layer.per_token += (keys.size + values.size) // keys.shape[2] * act_bytes
                cap = getattr(c, "max_size", None) or getattr(c, "chunk_size", None)
                layer.cap = cap if isinstance(cap, int) else None
                layer.heads = keys.shape[1]
            else:
                layer.fixed += sum(a.size for a in tree_flatten(c.state) if isinstance(a, mx.array)) * act_bytes
        kv.append(layer)
    return ops, kv


@dataclass
class LayerBytes:
    dense: int = 0  # read whole per token by whoever holds the layer
    tp_whole: int = 0  # the part of `dense` mlx-lm's tensor parallel keeps whole (norms, router, MLA down-projections)
    shared: int = 0  # shared experts: one host holds them under expert parallel
    experts: int = 0  # every routed expert of the layer
    num_experts: int = 0
    top_k: int = 0
    block: str = ""  # the MoE block's module path

    @property
    def per_expert(self) -> float:
        return self.experts / self.num_experts if self.num_experts else 0.0

    @property
    def active(self) -> float:
        """Bytes one token reads in a single process."""
        return self.dense + self.shared + self.top_k * self.per_expert

    @property
    def total(self) -> int:
        return self.dense + self.shared + self.experts


@dataclass
class Inventory:
    """A checkpoint's bytes by where they sit in the model."""

    layers: List[LayerBytes]
    embed: int = 0  # embedding tables
    embed_row: int = 0  # what one token reads of them
    tied: bool = False  # the embedding is also the output head
    other: int = 0  # final norm, head, anything outside the layers
    dropped: int = 0  # tensors the loader drops (layers past the model's, e.g. MTP)
    notes: List[str] = field(default_factory=list)

    @property
    def replicated(self) -> int:
        """What every host holds under expert parallel but the experts."""
        return sum(l.dense for l in self.layers) + self.embed + self.other

    @property
    def outside_read(self) -> float:
        """Bytes read per token outside the layers: head, norm, one embedding row."""
        return self.other + (self.embed if self.tied else self.embed_row)

    @property
    def total(self) -> int:
        return sum(l.total for l in self.layers) + self.embed + self.other


# Inside a layer, what mlx-lm's `shard()` leaves whole on every rank.
_TP_WHOLE = re.compile(r"norm|\.gate\.|\.router\.|e_score_correction|q_a_proj|kv_a_proj")


def inventory(info: CheckpointInfo, model: nn.Module, top_k_default: Optional[int] = None) -> Inventory:
    prefix = layers_path(model)
    n_layers = len(model.layers)
    inv = Inventory([LayerBytes() for _ in range(n_layers)])
    blocks = {}
    for path, moe, _ in find_moe_blocks(model):
        m = re.match(re.escape(prefix) + r"\.(\d+)\.", path + ".")
        if m is None:
            continue
        layer = inv.layers[int(m.group(1))]
        layer.block, layer.num_experts = path, moe.num_experts
        layer.top_k = moe.top_k or top_k_default or moe.num_experts
        if not (moe.top_k or top_k_default):
            inv.notes.append(f"{path}: no top-k found; assumed every expert is active")
        blocks[path] = (moe, layer)
    embeddings = {p for p, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))}
    inv.tied = not any(p.rsplit(".", 1)[-1] in ("lm_head", "output") for p, _ in model.named_modules())
    for name, t in info.tensors.items():
        owner = name.rsplit(".", 1)[0]
        if owner in embeddings:
            inv.embed += t.nbytes
            inv.embed_row += t.nbytes // max(1, t.shape[0])
            continue
        m = re.match(re.escape(prefix) + r"\.(\d+)\.", name) or LAYER.search(name)
        if m is None:
            inv.other += t.nbytes
            continue
        i = int(m.group(1))
        if i >= n_layers:
            inv.dropped += t.nbytes
            continue
        layer = inv.layers[i]
        if layer.block and name.startswith(layer.block + "."):
            moe, _ = blocks[layer.block]
            rest = name[len(layer.block) + 1:]
            stacked = rest.startswith((moe.experts + ".", "experts.")) and t.shape[:1] == (moe.num_experts,)
            if stacked or re.match(r"experts\.\d+\.", rest):  # stacked, or one expert of an HF checkpoint
                layer.experts += t.nbytes
                continue
            if any(rest.startswith(s + ".") for s in moe.shared):
                layer.shared += t.nbytes
                continue
        layer.dense += t.nbytes
        if _TP_WHOLE.search(name):
            layer.tp_whole += t.nbytes
    if inv.dropped:
        inv.notes.append(f"{inv.dropped / GB:.2f} GB of tensors past the model's layers (e.g. MTP) are not loaded")
    return inv


@dataclass
class Model:
    """Everything the estimates need, read once."""

    info: CheckpointInfo
    nn: nn.Module
    inv: Inventory
    ops: int  # per decode step, single process
    kv: List[KVLayer]
    act_bytes: int
    hidden: int

    @classmethod
    def read(cls, info: CheckpointInfo) -> "Model":
        model = build_model(info)
        act_bytes = SAFETENSORS_DTYPES[info.activation_dtype()].loaded_bytes
        text = info.config.get("text_config", info.config)
        top_k = top_k_of(text)
        hidden = text.get("hidden_size") or info.config.get("hidden_size") or 0
        inv = inventory(info, model, top_k)
        try:
            ops, kv = trace_decode(model, act_bytes)
        except Exception as e:  # e.g. a model whose kernels exist only on Metal, traced on Linux
            ops, kv = _untraced(text, len(inv.layers), act_bytes)
            inv.notes.append(f"could not trace a decode step here ({type(e).__name__}: {str(e)[:80]}); "
                             f"ops ({OPS_PER_LAYER} per layer) and KV cache (full attention) are estimated")
        return cls(info, model, inv, ops, kv, act_bytes, hidden)

    @property
    def layer_ops(self) -> float:
        return self.ops / max(1, len(self.inv.layers))

    def kv_read(self, i: int, position: int) -> float:
        return self.kv[i].at(position) if i < len(self.kv) else 0
