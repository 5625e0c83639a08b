"""lightning-ddg: decoupled parallel backpropagation with delayed gradients for PyTorch Lightning."""

from lightning_ddg.partition import Partition, split_module
from lightning_ddg.reference import DDGReference
from lightning_ddg.stage import DDGStage
from lightning_ddg.topology import StageLinks, Topology

__all__ = ["DDGReference", "DDGStage", "Partition", "StageLinks", "Topology", "split_module"]
__version__ = "0.1.0"
