"""SAM / SSAM under the PyTorch Lightning Trainer: a small CNN on scikit-learn's digits (no download).

    pip install -e ".[lightning]" scikit-learn
    python examples/lightning_train.py                                   # SAM, float32
    python examples/lightning_train.py --method ssam-fisher --precision bf16-mixed
    python examples/lightning_train.py --method ssam-dynamic --sparsity 0.9 --precision 16-mixed   # on a GPU

All sparsam needs from Lightning is one callback, SAMCallback: it runs the two passes through the
Trainer's precision plugin (16-mixed included), clips the descent gradient once, keeps BatchNorm
statistics and logged values from the clean pass, and hands the training dataloader and the
module's loss_fn to a Fisher mask. See docs/frameworks.md.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsam import SAM, SSAM
from sparsam.integrations.lightning import SAMCallback, in_descent_pass
from sparsam.masks import DynamicMask, FisherMask, RandomMask

METHODS = ("sgd", "sam", "ssam-fisher", "ssam-dynamic", "ssam-random")


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """1437 training and 360 test images, 1x8x8, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:360], perm[360:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


class DigitsClassifier(L.LightningModule):
    def __init__(self, args: argparse.Namespace, steps_per_epoch: int, total_steps: int) -> None:
        super().__init__()
        self.args, self.steps_per_epoch, self.total_steps = args, steps_per_epoch, total_steps
        self.net = small_cnn()
        self.loss_fn = F.cross_entropy  # SAMCallback hands it to the Fisher mask
        self.correct = 0  # a side effect of training_step: counted in pass 1 only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        if not in_descent_pass(self):
            self.correct += int((logits.argmax(1) == y).sum())  # host sync: logging only
        self.log("train_loss", loss, prog_bar=True)  # SAMCallback keeps pass 1's value
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        a = self.args
        kw = dict(lr=a.lr, momentum=0.9, weight_decay=5e-4)
        if a.method == "sgd":
            opt = torch.optim.SGD(self.parameters(), **kw)
        elif a.method == "sam":
            opt = SAM(self.parameters(), torch.optim.SGD, rho=a.rho, **kw)
        else:
            if a.method == "ssam-fisher":  # the authors' setting: Ns = 128, refreshed every epoch
                mask = FisherMask(
                    a.sparsity, num_samples=128, update_every_epochs=1, steps_per_epoch=self.steps_per_epoch
                )
            elif a.method == "ssam-dynamic":
                mask = DynamicMask(a.sparsity, self.total_steps, update_every=max(1, self.steps_per_epoch // 2))
            else:
                mask = RandomMask(a.sparsity, seed=a.seed)
            opt = SSAM(self.parameters(), torch.optim.SGD, rho=a.rho, mask=mask, **kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--method", choices=METHODS, default="sam")
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed (GPU), 64-true")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    p.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (quick runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of coordinates NOT perturbed (SSAM)")
    p.add_argument("--clip", type=float, default=None, help="gradient_clip_val (norm): the descent gradient")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_set, test_set = digits(args.seed)
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test = DataLoader(test_set, batch_size=360)
    per_epoch = len(train) if args.limit_train_batches is None else min(len(train), args.limit_train_batches)
    total = per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    model = DigitsClassifier(args, steps_per_epoch=per_epoch, total_steps=total)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches,
        precision=args.precision,
        accelerator=args.accelerator,
        gradient_clip_val=args.clip,
        callbacks=[SAMCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, test)
    acc = float(trainer.callback_metrics["val_acc"])
    print(f"{args.method}: test accuracy {acc:.4f} after {trainer.global_step} steps")
    return acc


if __name__ == "__main__":
    main()
