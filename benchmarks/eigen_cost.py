"""Cost of the top Hessian eigenvalue: sparsam.analysis.top_eigenvalues against a plain reference.

The reference is the textbook power iteration written with ``torch.autograd.grad`` (what PyHessian
does): for every iteration and every batch, a forward pass, the gradient with ``create_graph=True``,
and a second backward of ``g . v``; stop when the relative change of the Rayleigh quotient is at most
``tol``. With a single batch a second reference reuses the gradient graph across iterations
(PyHessian's single-batch mode).

Every method gets the same model, batches, start vector (Gaussian, seed 0), maximum number of
Hessian-vector products and tolerance. Methods are run interleaved, the order rotated every
repetition (A B C, B C A, C A B, ...), and the table reports medians, the range, and the ratio of
medians to the plain reference; "HVPs" is the number of Hessian-vector products the method used
(the maximum means it stopped without meeting ``tol``). ``lanczos`` stops on a different, stricter
test (relative Ritz residual at most ``tol``). "rel. error" is measured against a tight Lanczos run
(residual 1e-6), computed once outside the timings.

    python benchmarks/eigen_cost.py                        # CPU, ResNet-18 (width 16), CIFAR-sized batches
    python benchmarks/eigen_cost.py --device cuda --batch-size 128 --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sparsam.analysis as A
from sparsam.analysis import _common


# ---------------------------------------------------------------------------------------------
# Model: sparsam's CIFAR ResNet-18 when it is there, else a tiny ResNet written here
# ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class TinyResNet(nn.Module):
    """A ResNet-18-shaped CIFAR network (2 blocks per stage, widths w, 2w, 4w, 8w)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def build_model(width: int) -> tuple[nn.Module, str]:
    try:
        from sparsam.models import create_model

        return create_model("resnet18", num_classes=10, in_channels=3, width=width), f"sparsam resnet18 (width {width})"
    except ImportError:
        return TinyResNet(width), f"TinyResNet (width {width}, in this script)"


# ---------------------------------------------------------------------------------------------
# The reference: plain power iteration with torch.autograd.grad
# ---------------------------------------------------------------------------------------------
def reference_power(model, loss_fn, batches, n_iter, tol, start, *, reuse_graph=False, counter=None):
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)
    v = [t.view_as(p).to(p) for t, p in zip(torch.split(start, [p.numel() for p in params]), params)]
    norm = torch.sqrt(sum((t * t).sum() for t in v))
    v = [t / norm for t in v]
    cached = None
    if reuse_graph:
        loss = sum(loss_fn(model(x), y) * (len(y) / total) for x, y in batches)
        cached = torch.autograd.grad(loss, params, create_graph=True)
    lam = None
    for _ in range(n_iter):
        if cached is not None:
            hv = list(torch.autograd.grad(cached, params, grad_outputs=v, retain_graph=True))
        else:
            hv = [torch.zeros_like(p) for p in params]
            for x, y in batches:
                loss = loss_fn(model(x), y) * (len(y) / total)
                g = torch.autograd.grad(loss, params, create_graph=True)
                gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
                for acc, h in zip(hv, torch.autograd.grad(gv, params)):
                    acc.add_(h)
        if counter is not None:
            counter[0] += 1
        lam_new = float(sum((h * t).sum() for h, t in zip(hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
        if lam is not None and abs(lam_new - lam) <= tol * abs(lam_new):
            return lam_new
        lam = lam_new
    return lam


# ---------------------------------------------------------------------------------------------
def count_sparsam_hvps() -> tuple[list[int], Callable[[], None]]:
    """Count Hessian-vector products of sparsam's objective (instrumentation for the table)."""
    counter = [0]
    original = _common.Objective.hvp

    def counted(self, vs):
        counter[0] += 1
        return original(self, vs)

    _common.Objective.hvp = counted

    def restore() -> None:
        _common.Objective.hvp = original

    return counter, restore


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, model_name = build_model(args.width)
    model = model.to(device).train(args.mode == "train")
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    print(
        f"model: {model_name}, {n_params:,} parameters, {args.mode} mode, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"settings: n_iter (max HVPs) = {args.n_iter}, tol = {args.tol}, reps = {args.reps}, "
        f"batch size = {args.batch_size}\n"
    )
    counter, restore = count_sparsam_hvps()
    try:
        for n_batches in args.batches:
            batches = [
                (
                    torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device),
                    torch.randint(0, 10, (args.batch_size,), generator=gen).to(device),
                )
                for _ in range(n_batches)
            ]
            start = torch.randn(n_params, generator=torch.Generator().manual_seed(0)).to(device)
            ref_count = [0]
            methods: dict[str, Callable[[], float]] = {
                "reference power (plain)": lambda: reference_power(
                    model, F.cross_entropy, batches, args.n_iter, args.tol, start, counter=ref_count
                ),
            }
            if n_batches == 1:
                methods["reference power (graph reused)"] = lambda: reference_power(
                    model, F.cross_entropy, batches, args.n_iter, args.tol, start, reuse_graph=True, counter=ref_count
                )
            methods["sparsam power"] = lambda: A.top_eigenvalues(
                model,
                F.cross_entropy,
                batches,
                which="LM",
                method="power",
                n_iter=args.n_iter,
                tol=args.tol,
                generator=0,
            )[0]
            methods["sparsam lanczos (default)"] = lambda: A.top_eigenvalues(
                model, F.cross_entropy, batches, n_iter=args.n_iter, tol=args.tol, generator=0
            )[0]
            times: dict[str, list[float]] = {m: [] for m in methods}
            values: dict[str, float] = {}
            hvps: dict[str, int] = {}
            names = list(methods)
            for rep in range(args.reps):  # interleaved, order rotated each repetition: A B C, B C A, ...
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    counter[0] = ref_count[0] = 0
                    sync(device)
                    t0 = time.perf_counter()
                    values[name] = methods[name]()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                    hvps[name] = counter[0] + ref_count[0]
            # Accuracy: a tight Lanczos run (outside the timings). Every estimate in the table is a
            # Rayleigh quotient, hence at most lambda_max: the larger, the closer.
            accurate = {
                which: A.top_eigenvalues(
                    model, F.cross_entropy, batches, which=which, n_iter=args.accurate_n_iter, tol=1e-6
                )[0]
                for which in ("LA", "LM")
            }
            ref = statistics.median(times["reference power (plain)"])
            print(f"### {n_batches} batch{'es' if n_batches > 1 else ''} of {args.batch_size}\n")
            print(
                f"largest eigenvalue {accurate['LA']:.4f}, largest in magnitude {accurate['LM']:.4f} "
                "(Lanczos, relative residual <= 1e-6); power rows are compared with the latter\n"
            )
            print("| method | median time (s) | min-max (s) | time / reference | HVPs | top eigenvalue | rel. error |")
            print("|---|---|---|---|---|---|---|")
            for name in methods:
                med = statistics.median(times[name])
                truth = accurate["LA" if "lanczos" in name else "LM"]
                err = abs(values[name] - truth) / abs(truth)
                print(
                    f"| {name} | {med:.2f} | {min(times[name]):.2f}-{max(times[name]):.2f} | {med / ref:.2f} "
                    f"| {hvps[name]} | {values[name]:.4f} | {err:.1e} |"
                )
            print()
    finally:
        restore()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (default 16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="numbers of batches to try")
    p.add_argument("--n-iter", type=int, default=20, help="maximum Hessian-vector products per eigenvalue")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--accurate-n-iter", type=int, default=100, help="max HVPs of the accurate reference value")
    p.add_argument("--mode", choices=["eval", "train"], default="train")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
