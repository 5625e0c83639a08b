"""lightning-ddg: decoupled parallel backpropagation with delayed gradients for PyTorch Lightning.

Importing the package registers the strategy names ``"ddg"`` and ``"ddg_spawn"`` with Lightning.
"""

import logging

# quiet unless the application configures logging: logging.getLogger("lightning_ddg").setLevel(logging.INFO)
logging.getLogger("lightning_ddg").addHandler(logging.NullHandler())

# first, before torch and Lightning are imported: a rank re-launched by strategy="ddg" ends with its launcher
from lightning_ddg.lifeline import watch_launcher_from_environment

watch_launcher_from_environment()

from lightning.pytorch.strategies import StrategyRegistry

from lightning_ddg.build import BuiltStage, build_stage
from lightning_ddg.cutting import measured_split_points
from lightning_ddg.partition import Partition, TiedWeight, split_module
from lightning_ddg.planning import Plan, StagePlan, plan
from lightning_ddg.reference import DDGReference
from lightning_ddg.stage import DDGStage
from lightning_ddg.strategy import DDGStrategy
from lightning_ddg.topology import StageLinks, Topology

DDGStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "BuiltStage",
    "DDGReference",
    "DDGStage",
    "DDGStrategy",
    "Partition",
    "Plan",
    "StageLinks",
    "StagePlan",
    "TiedWeight",
    "Topology",
    "build_stage",
    "measured_split_points",
    "plan",
    "split_module",
]
__version__ = "0.1.0"
