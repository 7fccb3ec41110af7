"""The optimizer's own work: ``first_step + second_step`` of SAM and SSAM against one ``SGD.step``.

Gradients are put in place once (random, fixed); no forward or backward runs. Every round times
one step of each optimizer in turn (A B C A B C ...), each on its own copy of the model, and the
figure is the median over rounds of the per-round ratio to ``SGD.step`` (momentum 0.9, weight
decay 5e-4, the same for every base); SAM's and SSAM's are to stay at or below 2.3x. Timings of whole training steps are in ``step_cost.py``.

Rows: sparsam's SAM and SSAM (random mask) with the storage exchange (the default) and with
``exchange=False`` (w copied away and back, as under FSDP2), and, for reference, the rule of the
authors' and davda54/sam's code written here from its formula: e kept, w restored by subtracting
it (inexact), SSAM's mask a float tensor. MSAM rows: Momentum-SAM's ``first_step`` (the perturbation
along the momentum, its norm included) + ``second_step`` (restore, SGD step), dense and on the random
mask; their base optimizer has taken one step first, so the momentum exists.

    python benchmarks/optimizer_cost.py                       # ResNet-18 width 64, 1 thread
    python benchmarks/optimizer_cost.py --width 16 --rounds 31
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sparsam import MSAM, SAM, SSAM, SparseMSAM
from sparsam.masks import RandomMask
from sparsam.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.5, help="SSAM's random-mask sparsity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        m = create_model(args.model, num_classes=10, in_channels=3, width=args.width)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        return m

    def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def sam(exchange: bool) -> SAM:
        m = model()
        return SAM(sgd(m), rho=0.05, model=m, exchange=exchange)

    def ssam(exchange: bool) -> SAM:
        m = model()
        return SSAM(sgd(m), rho=0.05, mask=RandomMask(args.sparsity, seed=0), model=m, exchange=exchange)

    def msam(exchange: bool, sparse: bool = False) -> SAM:
        m = model()
        kw = {"rho": 3.0, "model": m, "exchange": exchange}
        opt = SparseMSAM(sgd(m), mask=RandomMask(args.sparsity, seed=0), **kw) if sparse else MSAM(sgd(m), **kw)
        opt.base_optimizer.step()  # the momentum MSAM perturbs along (none before the first step)
        return opt

    def subtracting(masked: bool) -> Callable[[], None]:
        """The restore-by-subtraction rule of the authors' and davda54/sam's code, written here from
        the formula (not their code): e = rho * m * g / ||g||, w += e, e kept; then w -= e (inexact)
        and the base step. Its mask, as in the authors' SSAM code, is a float tensor of w's size."""
        m = model()
        opt = sgd(m)
        params = list(m.parameters())
        gen = torch.Generator().manual_seed(0)
        masks = [(torch.rand(p.shape, generator=gen) >= args.sparsity).float() for p in params] if masked else None
        kept: list[torch.Tensor] = []

        @torch.no_grad()
        def run() -> None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = 0.05 / (norm + 1e-12)
            kept.clear()
            for i, p in enumerate(params):
                e = p.grad * scale
                if masks is not None:
                    e.mul_(masks[i])
                p.add_(e)
                kept.append(e)
            for p, e in zip(params, kept):
                p.sub_(e)
            opt.step()

        return run

    base = sgd(model())

    def timed(fn: Callable[[], None]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def two_step(opt: SAM) -> Callable[[], None]:
        def run() -> None:
            opt.first_step()
            opt.second_step()

        return run

    variants = {
        "SAM": two_step(sam(True)),
        "SAM, exchange=False (copy w back)": two_step(sam(False)),
        "SAM by subtraction (the authors' rule, inexact)": subtracting(False),
        f"SSAM random s={args.sparsity}": two_step(ssam(True)),
        f"SSAM random s={args.sparsity}, exchange=False": two_step(ssam(False)),
        f"SSAM s={args.sparsity} by subtraction, float mask (the authors' rule)": subtracting(True),
        "MSAM": two_step(msam(True)),
        "MSAM, exchange=False": two_step(msam(False)),
        f"sparse MSAM random s={args.sparsity}": two_step(msam(True, sparse=True)),
    }
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        t_sgd = timed(base.step)
        for name, fn in variants.items():
            t = timed(fn)
            if r >= args.warmup:
                ratios[name].append(t / t_sgd)
    n_params = sum(p.numel() for g in base.param_groups for p in g["params"])
    print(
        f"{args.model} width {args.width} ({n_params / 1e6:.2f}M params), {args.threads} thread(s), "
        f"torch {torch.__version__}, {args.rounds} rounds"
    )
    print("\n| first_step + second_step of | x SGD.step (median) | min | max |\n|---|---:|---:|---:|")
    for name, rs in ratios.items():
        print(f"| {name} | {statistics.median(rs):.2f} | {min(rs):.2f} | {max(rs):.2f} |")


if __name__ == "__main__":
    main()
