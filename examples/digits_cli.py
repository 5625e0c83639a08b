"""The digits example as a LightningCLI script: choose the strategy on the command line.

Run it from the repository root::

    python examples/digits_cli.py fit --trainer.strategy ddg --trainer.devices 2 --trainer.max_epochs 5
    python examples/digits_cli.py fit --trainer.devices 1 --trainer.max_epochs 5      # plain backpropagation

The only change a LightningCLI script needs is ``import lightning_ddg``, which registers ``ddg`` and
``ddg_spawn`` as strategy names.
"""

from digits_cnn import DigitsCNN, DigitsDataModule
from lightning.pytorch.cli import LightningCLI

import lightning_ddg  # noqa: F401  registers strategy="ddg" and strategy="ddg_spawn"

if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsDataModule, trainer_defaults={"accelerator": "cpu"})
