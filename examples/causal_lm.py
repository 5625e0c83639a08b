"""Fine-tune a small causal language model from Hugging Face ``transformers`` with DDG on CPU processes.

The LightningModule is written as for any strategy: the dict batch goes to the model as keyword arguments, the
model computes the loss from ``labels`` and returns it in ``outputs.loss``. ``Trainer(strategy="ddg",
devices=2)`` cuts the model between its decoder layers (``LlamaForCausalLM``'s forward cannot be traced by
``torch.fx``, so the strategy opens it with ``torch.export`` on the first batch) and trains the stages with
decoupled parallel backpropagation.

Everything runs offline: the model is built from a config with random weights (``--model llama`` or ``gpt2``),
and the text is this file's own docstrings and comments, tokenized byte by byte. Run it from the repository root::

    python examples/causal_lm.py                               # tiny Llama, 2 stages
    python examples/causal_lm.py --model gpt2 --devices 3      # tiny GPT-2 (untied head), 3 stages
    python examples/causal_lm.py --strategy auto --devices 1   # plain backpropagation, for comparison

The last line printed is ``final train_loss=<loss>``; the loss starts near ln(256) = 5.5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader, Dataset

import lightning_ddg  # noqa: F401 - registers strategy="ddg"

VOCAB = 256  # bytes


class ByteText(Dataset):
    """Windows of ``block`` bytes of a text, as a tokenizer and a collator give them to a causal LM."""

    def __init__(self, text: str, block: int) -> None:
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.windows = data[: len(data) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class CausalLM(L.LightningModule):
    def __init__(self, model: transformers.PreTrainedModel, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def build(name: str, layers: int) -> transformers.PreTrainedModel:
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    # GPT-2 ties its output layer to its input embedding by default: untied, each can live on its own stage
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=layers, n_head=4, tie_word_embeddings=False
    )
    return transformers.GPT2LMHeadModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--strategy", default="ddg")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    data = ByteText(Path(__file__).read_text(), args.block)
    model = CausalLM(build(args.model, args.layers))
    trainer = L.Trainer(
        strategy=args.strategy,
        devices=args.devices,
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True))
    if trainer.is_global_zero:
        print(f"final train_loss={float(trainer.callback_metrics['train_loss']):.4f}")


if __name__ == "__main__":
    main()
