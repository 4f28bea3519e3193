"""mlx-moe: expert-parallel inference for Mixture-of-Experts models on
several Apple-silicon Macs, built on mlx-lm."""

from .batch import batch_generate
from .loader import load_sharded
from .parallel.comm import comm_stats, reset_comm_stats
from .parallel.plan import PlanError, ShardingPlan, plan

__all__ = ["load_sharded", "batch_generate", "plan", "comm_stats", "reset_comm_stats", "ShardingPlan", "PlanError"]
