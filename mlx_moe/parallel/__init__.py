"""Sharding a model over ranks: the strategy registry and plan (plan.py),
expert parallel (expert.py, with attention.py, data_parallel.py,
placement.py and the block handlers of architectures.py), tensor-parallel
attention and dense blocks around expert-parallel experts (tensor.py,
`hybrid`), the pipeline fallback (pipeline.py), the collectives (comm.py), and every rank in one
process for checks (simulate.py)."""

from . import expert, pipeline  # register the strategies; auto tries them in this order
from . import tensor  # hybrid: chosen by name
from . import architectures  # block handlers, tried before the generic one
