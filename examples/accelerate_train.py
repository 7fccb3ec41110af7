"""SAM / SSAM in a Hugging Face Accelerate loop: a small CNN on scikit-learn's digits (no download).

    pip install -e ".[accelerate]" scikit-learn
    python examples/accelerate_train.py                                  # SAM, float32
    python examples/accelerate_train.py --mixed-precision bf16 --grad-accum 4 --method ssam-fisher
    accelerate launch --num_processes 2 examples/accelerate_train.py     # DDP

SAMStep runs both passes of every (micro-)batch, perturbs once per optimizer step, and steps
through Accelerate's GradScaler under fp16. See docs/frameworks.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsam import SAM, SSAM
from sparsam.integrations import unwrap_optimizer
from sparsam.integrations.accelerate import SAMStep
from sparsam.masks import FisherMask, RandomMask

METHODS = ("sam", "ssam-fisher", "ssam-random")


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


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--method", choices=METHODS, default="sam")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="per optimizer step, split into --grad-accum")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of coordinates NOT perturbed (SSAM)")
    p.add_argument("--clip", type=float, default=None, help="max_grad_norm of the descent gradient")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum, cpu=args.cpu
    )
    set_seed(args.seed)
    train_set, test_set = digits(args.seed)
    micro = args.batch_size // args.grad_accum
    train = DataLoader(train_set, batch_size=micro, shuffle=True, drop_last=True)
    test = DataLoader(test_set, batch_size=360)
    steps_per_epoch = len(train) // args.grad_accum
    total = steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps

    model = small_cnn()
    kw = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4, max_grad_norm=args.clip)
    if args.method == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, **kw)
    else:
        if args.method == "ssam-fisher":  # Ns = 128 samples, refreshed every epoch
            mask = FisherMask(args.sparsity, num_samples=128, update_every_epochs=1, steps_per_epoch=steps_per_epoch)
        else:
            mask = RandomMask(args.sparsity, seed=args.seed)
        # The Fisher mask reads batches from `data` with `model` and `loss_fn`.
        opt = SSAM(model.parameters(), torch.optim.SGD, rho=args.rho, mask=mask, loss_fn=F.cross_entropy, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    model, opt, train, test, sched = accelerator.prepare(model, opt, train, test, sched)
    if isinstance(unwrap_optimizer(opt), SSAM):
        unwrap_optimizer(opt).data = train  # the prepared loader: each process reads its own shard
    sam_step = SAMStep(accelerator, opt, model=model)  # model=: BatchNorm from pass 1, DDP no_sync

    def compute_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    steps = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            with accelerator.accumulate(model):
                loss = sam_step(compute_loss, x, y)
                sched.step()
            steps += accelerator.sync_gradients
            if steps == total:
                break
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in test:
                pred, y = accelerator.gather_for_metrics((model(x).argmax(1), y))
                correct, n = correct + int((pred == y).sum()), n + len(y)  # host sync: once per epoch
        accelerator.print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {correct / n:.4f}")
        if steps == total:
            break
    return correct / n


if __name__ == "__main__":
    main()
