"""Fit the ecosystem's models (Hugging Face, timm, torchvision, Lightning's demo) with plain
``Trainer(strategy="ddg", devices=K)``: tiny configs, random weights, no split points, no hints.

``python tests/ecosystem_job.py K [--timed] [NAME ...]`` fits each model of :data:`ZOO` for a few steps on K CPU
processes, one after the other in the same processes; for each, rank 0 prints one line ``ecosystem NAME {json}``
with the fit's plan and what the fit did to the weights, or ``ecosystem NAME {"skipped": reason}`` for a model that
cannot be cut yet. The fits run under ``Trainer(deterministic=True)``, where the strategy balances the stages by
FLOPs, which a loaded machine does not change; with ``--timed``, by time, as it does by default. The
LightningModules are written the way their libraries' users write them: a dict batch given to the model as keyword
arguments, ``labels`` in the batch and ``outputs.loss`` from the model, an ``attention_mask``, gradient
checkpointing switched on.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import timm
import torch
import torchvision
import transformers
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_ddg  # noqa: F401 - registers strategy="ddg"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.zoo_job import Classifier  # noqa: E402

STEPS = 2
BATCH = 2
SEQUENCE = 16
VOCAB = 128


class TokenBatches(Dataset):
    """Dict samples as a tokenizer and a collator make them: ``input_ids``, ``attention_mask`` (the last tokens of
    every other sample padded) and ``labels``."""

    def __init__(self, n: int, labels: str = "tokens") -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQUENCE), generator=g)
        self.mask = torch.ones(n, SEQUENCE, dtype=torch.long)
        self.mask[1::2, -3:] = 0
        self.labels = self.ids.clone() if labels == "tokens" else torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class HFModel(L.LightningModule):
    """A Hugging Face model as its users wrap it: the batch goes to the model whole, the model computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        outputs = self(batch)
        self.log("train_loss", outputs.loss)
        return outputs.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class HFNamedInputs(HFModel):
    """The other habit: ``forward`` names the model's inputs, ``training_step`` unpacks the dict batch."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        outputs = self(**batch)
        self.log("train_loss", outputs.loss)
        return outputs.loss


class Images(Classifier):
    """The zoo's image classifier, trained with AdamW as vision transformers usually are."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class DemoTransformer(L.LightningModule):
    """``lightning.pytorch.demos.LightningTransformer`` with a small vocabulary: nn.Transformer with masks."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=3)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, target)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        loss = nn.functional.nll_loss(self(inputs, target), target.view(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def llama() -> L.LightningModule:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable()
    return HFModel(model)


def gpt2(tied: bool = True) -> L.LightningModule:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=6, n_head=4, tie_word_embeddings=tied
    )
    return HFNamedInputs(transformers.GPT2LMHeadModel(config))


def bert() -> L.LightningModule:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return HFModel(transformers.BertForSequenceClassification(config))


def t5(tied: bool = True) -> L.LightningModule:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_heads=4,
        tie_word_embeddings=tied,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return HFModel(transformers.T5ForConditionalGeneration(config))


def images(n: int, size: int) -> Dataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,)))


def tokens_and_targets(n: int) -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQUENCE + 1), generator=g)
    return torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])


IMAGE = 32
# name: (LightningModule, its data, why it is skipped or None)
ZOO: dict[str, tuple[Callable[[], L.LightningModule], Callable[[int], Dataset], str | None]] = {
    "hf_llama": (llama, TokenBatches, None),
    "hf_gpt2": (gpt2, TokenBatches, None),
    "hf_gpt2_untied": (lambda: gpt2(tied=False), TokenBatches, None),
    "hf_bert": (bert, lambda n: TokenBatches(n, labels="classes"), None),
    "hf_t5": (t5, TokenBatches, None),
    "timm_vit": (
        lambda: Images(
            timm.create_model(
                "vit_tiny_patch16_224", img_size=IMAGE, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10
            )
        ),
        lambda n: images(n, IMAGE),
        None,
    ),  # fmt: skip
    "timm_convnext": (
        lambda: Images(timm.create_model("convnext_atto", num_classes=10)),
        lambda n: images(n, IMAGE),
        None,
    ),
    "torchvision_vit": (
        lambda: Images(
            torchvision.models.VisionTransformer(
                image_size=IMAGE, patch_size=8, num_layers=6, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
            )
        ),
        lambda n: images(n, IMAGE),
        None,
    ),  # fmt: skip
    "torchvision_swin": (
        lambda: Images(
            torchvision.models.SwinTransformer(
                patch_size=[2, 2],
                embed_dim=16,
                depths=[2, 2, 2, 2],
                num_heads=[2, 2, 2, 2],
                window_size=[2, 2],
                num_classes=10,
            )
        ),
        lambda n: images(n, IMAGE),
        None,
    ),  # fmt: skip
    "lightning_demo_transformer": (DemoTransformer, tokens_and_targets, None),
}


def main(devices: int, names: list[str], timed: bool = False) -> None:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    gc.freeze()  # the libraries' objects: each fit's garbage collection then scans only what the fits made
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the launched ranks run this loop too
    for name in names or list(ZOO):
        build, data, skipped = ZOO[name]
        if skipped is not None:
            if rank == 0:
                print(f"ecosystem {name} {json.dumps({'skipped': skipped})}", flush=True)
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        model = build()
        loader = DataLoader(data(STEPS * BATCH), batch_size=BATCH)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = L.Trainer(
            strategy="ddg",
            devices=devices,
            accelerator="cpu",
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=not timed,  # the strategy then balances by FLOPs
        )
        trainer.fit(model, loader)
        if trainer.is_global_zero:
            used = trainer.strategy.plan
            after = dict(model.named_parameters())
            report = {
                "split_points": used.split_points,
                "imbalance": used.imbalance,
                "balance_by": used.balance_by,
                "opened": used.opened_modules,
                "loss": float(trainer.callback_metrics["train_loss"]),
                "unchanged": [n for n in before if torch.equal(before[n], after[n])],
                "not_finite": [n for n, p in after.items() if not torch.isfinite(p).all()],
                "seconds": round(time.perf_counter() - start, 1),
            }
            assert math.isfinite(report["loss"])
            print(f"ecosystem {name} {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [a for a in sys.argv[2:] if a != "--timed"], timed="--timed" in sys.argv)
