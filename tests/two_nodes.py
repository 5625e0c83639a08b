"""One node of a two-node run for the scale-out tests: ``torchrun --nnodes=2 --nproc-per-node=2 ...
-m tests.two_nodes OUT`` on each node fits 2 stages × 2 replicas and saves each rank's place and final weights.

The replica on node 1 starts from other random weights than node 0's: the strategy must give it replica 0's.
"""

from __future__ import annotations

import sys

import torch

from lightning_ddg import DDGStrategy
from tests.lightning_models import MLPClassifier, cpu_trainer, loader


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = cpu_trainer(DDGStrategy(num_stages=2, balance_by="params"), devices=2, num_nodes=2, max_epochs=1)
    model = MLPClassifier(optimizer="sgd", seed=trainer.node_rank)
    trainer.fit(model, loader())
    strategy = trainer.strategy
    place = {
        "node": trainer.node_rank,
        "stage": strategy.stage_index,
        "replica": strategy.topology.replica_of(trainer.global_rank),
        "environment": type(strategy.cluster_environment).__name__,
    }
    torch.save(place | {"weights": model.state_dict()}, f"{out_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
