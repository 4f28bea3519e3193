"""Block handlers for the MoE blocks the generic expert-parallel path cannot
serve unchanged: one class per quirk, matched by the mlx-lm block class.

The generic path sums each block's output over the ranks, which is exact
when that output is the weighted sum of the expert outputs plus terms one
rank adds (shared experts). The blocks here break that in one of three ways:
a term every rank would add (identity experts, a bias after the experts),
an expert sum that goes through a non-linearity inside the block, or
kernels this runtime cannot check.

`tools/architectures.py` runs every mlx-lm MoE architecture through the
in-process parity check and writes docs/ARCHITECTURES.md.
"""

import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
from mlx_lm.models.kimi_k3 import KimiK3SparseMoE
from mlx_lm.models.longcat_flash import LongcatFlashMoE
from mlx_lm.models.muse_spark import MoE as MuseSparkMoE
from mlx_lm.models.nemotron_h import NemotronHMoE

from .expert import BlockHandler, ExpertParallelBlock, MoEBlock, register_block


class ZeroExpertsHere(nn.Module):
    """A router whose identity ("zero") experts get weight 0: the block then
    adds no `x * weight` term for them on this rank."""

    def __init__(self, router: nn.Module, num_experts: int):
        super().__init__()
        self.router = router
        self.num_experts = num_experts

    def __call__(self, x):
        indices, weights = self.router(x)
        return indices, mx.where(indices >= self.num_experts, 0, weights)


class IdentityExperts(BlockHandler):
    """longcat_flash: besides its real experts the router picks identity
    experts, whose output `x * weight` the block adds itself. Every rank
    would add it; only the holder keeps those weights."""

    name = "identity-experts"

    def match(self, block: nn.Module) -> Optional[MoEBlock]:
        if not isinstance(block, LongcatFlashMoE):
            return None
        return super().match(block)

    def shard(self, block, moe, holder, group):
        if not holder:
            block.router = ZeroExpertsHere(block.router, moe.num_experts)
        return super().shard(block, moe, holder, group)


class BiasAfterExperts(BlockHandler):
    """nemotron_h with a latent MoE: the expert sum goes through
    `fc2_latent_proj`, which is linear but may have a bias; only the holder
    keeps the bias so it is added once."""

    name = "bias-after-experts"

    def match(self, block: nn.Module) -> Optional[MoEBlock]:
        if not isinstance(block, NemotronHMoE) or "fc2_latent_proj" not in block:
            return None
        return super().match(block)

    def shard(self, block, moe, holder, group):
        if not holder and "bias" in block.fc2_latent_proj:
            del block.fc2_latent_proj["bias"]
        return super().shard(block, moe, holder, group)


class CombinePairs(BlockHandler):
    """kimi_k3 with a normalized latent MoE: the expert sum is RMS-normed
    inside the block, so partial sums cannot be added after it. The combine
    moves to the experts' per-pair outputs, which are whole on exactly one
    rank and zero elsewhere; the rest of the block, shared experts included,
    runs on every rank. It costs top-k times the latent width per token."""

    name = "combine-pairs"

    def match(self, block: nn.Module) -> Optional[MoEBlock]:
        if not isinstance(block, KimiK3SparseMoE) or block.routed_expert_norm is None:
            return None
        info = super().match(block)
        # Replicated: the shared experts are added after the combine.
        return info and replace(info, shared=())

    def shard(self, block, moe, holder, group):
        setattr(block, moe.experts, ExpertParallelBlock(block[moe.experts], group))
        return block


class Unsupported(BlockHandler):
    """Blocks expert parallel does not claim: `auto` falls back to pipeline."""

    name = "unsupported"
    reasons = {
        MuseSparkMoE: (
            "muse_spark combines its experts with Metal-only fused kernels after a "
            "norm stored inside the experts container; not verified"
        ),
    }

    def match(self, block: nn.Module) -> Optional[MoEBlock]:
        reason = self.reasons.get(type(block))
        info = super().match(block) if reason else None
        return info and replace(info, unsupported=reason)


for _handler in (IdentityExperts(), BiasAfterExperts(), CombinePairs(), Unsupported()):
    register_block(_handler)


_SWITCH = re.compile(r"\b(SwitchGLU|SwitchLinear|SwitchMLP)\b")
_IMPORT = re.compile(r"^from \.(?:(\w+) import|\s*import\s+([\w, ]+))", re.M)


def moe_model_types() -> Dict[str, List[str]]:
    """Every model type of the installed mlx-lm whose model has switch-linear
    experts: the files that use SwitchGLU / SwitchLinear / SwitchMLP and the
    ones built on them (e.g. kimi_k25 on deepseek_v3). Maps each to the
    MoE files it uses."""
    folder = Path(mlx_lm.models.__file__).parent
    sources = {f.stem: f.read_text() for f in folder.glob("*.py") if f.stem != "switch_layers"}
    imports = {}
    for name, text in sources.items():
        found = set()
        for single, several in _IMPORT.findall(text):
            found.update([single] if single else [n.strip() for n in several.split(",")])
        imports[name] = found & set(sources)
    uses = {name: [name] for name, text in sources.items() if _SWITCH.search(text)}
    grew = True
    while grew:
        grew = False
        for name in sources:
            via = sorted(m for dep in imports[name] if dep in uses for m in uses[dep])
            if via and name not in uses:
                uses[name] = sorted(set(via))
                grew = True
    return dict(sorted(uses.items(), key=lambda kv: kv[0].lower()))
