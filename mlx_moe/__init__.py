"""mlx-moe: expert-parallel inference for Mixture-of-Experts models on
several Apple-silicon Macs, built on mlx-lm."""

from . import expert, pipeline  # register the strategies; auto tries them in this order
from . import architectures  # block handlers, tried before the generic one
from .batch import batch_generate
from .comm import comm_stats, reset_comm_stats
from .loader import load_sharded
from .plan import PlanError, ShardingPlan, plan

__all__ = ["load_sharded", "batch_generate", "plan", "comm_stats", "reset_comm_stats", "ShardingPlan", "PlanError"]
