"""lightning-ddg: decoupled parallel backpropagation with delayed gradients for PyTorch Lightning.

Importing the package registers the strategy names ``"ddg"`` and ``"ddg_spawn"`` with Lightning.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_ddg.partition import Partition, split_module
from lightning_ddg.planning import Plan, StagePlan, plan
from lightning_ddg.reference import DDGReference
from lightning_ddg.stage import DDGStage
from lightning_ddg.strategy import DDGStrategy
from lightning_ddg.topology import StageLinks, Topology

DDGStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "DDGReference",
    "DDGStage",
    "DDGStrategy",
    "Partition",
    "Plan",
    "StageLinks",
    "StagePlan",
    "Topology",
    "plan",
    "split_module",
]
__version__ = "0.1.0"
