"""Cost of the Fisher information for SSAM-F: batched per-sample gradients vs the authors' loop.

Measures, on a CIFAR ResNet-18 (32x32 inputs, 10 classes) and Ns samples (default 128):

    A  sparsam.masks.fisher_information   per-sample gradients, vmap over chunks of samples
    B  batch-1 loop (the authors' method)  Ns forward+backward passes of one sample, train mode,
                                           p.grad**2 accumulated after each
    C  one gradient                        one forward+backward of the Ns samples as a batch
                                           (the cost of an ordinary mini-batch gradient)

Timings are interleaved A B C A B C ... and summarised by medians; only ratios are meaningful on
a shared machine. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during each variant; on
the CPU the growth of the peak resident set size while running the variant once in a fresh process
(Linux ``/proc/self/clear_refs`` + ``VmHWM``; tracemalloc cannot see torch's allocations).

    python benchmarks/fisher_cost.py                 # width 16, a few minutes on a CPU
    python benchmarks/fisher_cost.py --full          # also the full-width (64) ResNet-18
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from sparsam.masks import fisher_information


# ----------------------------------------------------------------------------- model
def _local_resnet18(width: int, num_classes: int = 10) -> nn.Module:
    """Plain CIFAR ResNet-18 (3x3 stem, stages w, 2w, 4w, 8w), used if sparsam.models is absent."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.b1(self.c1(x)))
            return F.relu(self.b2(self.c2(out)) + self.short(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for j in range(2):
            layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def make_model(width: int) -> tuple[nn.Module, str]:
    try:
        from sparsam.models import create_model
    except ImportError:
        return _local_resnet18(width), "local fallback"
    return create_model("resnet18", num_classes=10, in_channels=3, width=width), "sparsam.models"


# ----------------------------------------------------------------------------- variants
def setup(width: int, num_samples: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model, source = make_model(width)
    model = model.to(device).train()
    x = torch.randn(num_samples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (num_samples,), device=device)
    return model, source, x, y


def run_variant(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None) -> None:
    if name == "A":
        fisher_information(model, F.cross_entropy, [(x, y)], x.shape[0], chunk_size=chunk_size)
    elif name == "B":
        acc = [torch.zeros_like(p) for p in model.parameters()]
        for j in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]).backward()
            for a, p in zip(acc, model.parameters()):
                a.add_(p.grad.square())
        model.zero_grad(set_to_none=True)
    elif name == "C":
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    else:
        raise ValueError(name)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _rss_probe(queue, width, num_samples, name, chunk_size, threads):
    """In a fresh process: reset the RSS high-water mark (Linux /proc/self/clear_refs), run the
    variant once, report peak RSS minus RSS before (bytes); None where /proc is unavailable."""
    torch.set_num_threads(threads)
    model, _, x, y = setup(width, num_samples, "cpu")
    model_b = copy.deepcopy(model)
    run_variant("C", model, x[:2], y[:2], chunk_size)  # load kernels before the baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        queue.put(None)
        return
    run_variant(name, model_b if name == "B" else model, x, y, chunk_size)
    queue.put((_status_kib("VmHWM") - base) * 1024)


def peak_memory(width, num_samples, device, chunk_size, threads) -> dict[str, float]:
    out = {}
    if device.startswith("cuda"):
        model, _, x, y = setup(width, num_samples, device)
        model_b = copy.deepcopy(model)
        for name in "ABC":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run_variant(name, model_b if name == "B" else model, x, y, chunk_size)
            torch.cuda.synchronize()
            out[name] = torch.cuda.max_memory_allocated() - before
        return out
    ctx = mp.get_context("spawn")
    for name in "ABC":
        q = ctx.Queue()
        p = ctx.Process(target=_rss_probe, args=(q, width, num_samples, name, chunk_size, threads))
        p.start()
        out[name] = q.get()
        p.join()
    return out


def bench(width, num_samples, device, repeats, chunk_size, threads, memory) -> str:
    model, source, x, y = setup(width, num_samples, device)
    model_b = copy.deepcopy(model)  # the loop moves BN running statistics; keep A's model clean
    n_params = sum(p.numel() for p in model.parameters())
    times = {k: [] for k in "ABC"}
    for name in "ABC":  # warm-up
        run_variant(name, model_b if name == "B" else model, x, y, chunk_size)
    for r in range(repeats):
        for name in "ABC":
            _sync(device)
            t0 = time.perf_counter()
            run_variant(name, model_b if name == "B" else model, x, y, chunk_size)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        print(f"width {width}: repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = peak_memory(width, num_samples, device, chunk_size, threads) if memory else None
    labels = {
        "A": "A: fisher_information (batched, vmap)",
        "B": "B: batch-1 loop (authors)",
        "C": f"C: one gradient of {num_samples} samples",
    }
    lines = [
        f"ResNet-18 width {width} ({n_params / 1e6:.2f} M params, model from {source}), Ns = {num_samples}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"chunk_size {chunk_size or 'auto'}, {repeats} interleaved repeats (medians)",
        "",
        "| variant | time / B | time / C | peak memory (MiB) |",
        "|---|---|---|---|",
    ]
    for k in "ABC":
        m = f"{mem[k] / 2**20:.0f}" if mem and mem[k] is not None else "-"
        lines.append(f"| {labels[k]} | {med[k] / med['B']:.2f} | {med[k] / med['C']:.2f} | {m} |")
    spread = ", ".join(f"{k}: {min(v) / med[k]:.2f}-{max(v) / med[k]:.2f}" for k, v in times.items())
    lines.append("")
    lines.append(f"spread (min/median - max/median): {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width (default 16)")
    ap.add_argument("--full", action="store_true", help="also run the full-width (64) ResNet-18")
    ap.add_argument("--num-samples", type=int, default=128, help="Ns (default 128)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--chunk-size", type=int, default=None, help="fisher_information chunk_size (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    widths = [args.width] + ([64] if args.full and args.width != 64 else [])
    for w in widths:
        print(bench(w, args.num_samples, args.device, args.repeats, args.chunk_size, threads, args.memory))
        print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
