"""The measurements of ``benchmarks/gpu_check.sh`` that the other benchmark scripts do not cover.

Subcommands (each writes one Markdown table to ``--out`` and prints it):

    env        the machine: GPU, driver/CUDA, torch, sparsam's commit
    step-cost  the variants of benchmarks/step_cost.py (SGD, SAM, ASAM, SSAM ...) under autocast in
               bf16, or in fp16 with a torch.amp.GradScaler; each step is ``opt.step(closure,
               grad_scaler=...)``. Columns: whole step as ratios to SGD and to SAM (medians of
               per-round ratios, interleaved variants), peak device memory of the step.
    implicit   the implicit form (SSAM form="implicit") with masks that are 2:4 along the output
               dimension of every Linear layer of an MLP, so the ascent backward's dX can run on
               torch's 2:4 semi-structured kernels, against SAM and against the same implicit
               SSAM forced to the dense masked product. Reports whether the sparse kernel ran.

``--dry-run`` runs every subcommand's setup and one step of each variant on tiny sizes on the CPU
(no GPU needed; the numbers mean nothing): ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import AllOnesMask, select
from sparsam.optim import implicit as implicit_mod

HERE = Path(__file__).resolve().parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _step_cost_module() -> Any:
    spec = importlib.util.spec_from_file_location("step_cost", HERE / "step_cost.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """One optimizer step under autocast (and a GradScaler in fp16). SAM and its variants are driven
    through ``opt.step(closure, grad_scaler=...)`` with the closure of the pass contract
    (docs/variants.md: sub-batch ascent, ESAM's sample selection and its forward-only pass)."""
    ctx = (lambda: torch.autocast(x.device.type, dtype=DTYPES[precision])) if precision in DTYPES else nullcontext

    def losses_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with ctx():
            out = model(xb)
        return F.cross_entropy(out.float(), yb, reduction="none")

    def backward(value: torch.Tensor) -> None:
        (scaler.scale(value) if scaler is not None else value).backward()

    opt.zero_grad()
    if isinstance(opt, SAM):

        def closure() -> torch.Tensor | None:
            if getattr(opt, "current_pass", None) == "measure":  # forward only, at w + e
                opt.record_sample_losses(losses_of(x, y))  # type: ignore[attr-defined]
                return None
            idx = getattr(opt, "batch_index", None)
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            n = math.ceil(getattr(opt, "batch_fraction", 1.0) * xb.shape[0])
            losses = losses_of(xb[:n], yb[:n])
            if getattr(opt, "wants_sample_losses", False):
                opt.record_sample_losses(losses)  # type: ignore[attr-defined]
            loss = losses.mean()
            backward(loss)
            return loss.detach()

        opt.step(closure, grad_scaler=scaler)
    else:
        backward(losses_of(x, y).mean())
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()


def interleaved(
    runs: list[tuple[str, nn.Module, torch.optim.Optimizer, torch.amp.GradScaler | None]],
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
    warmup: int,
    rounds: int,
    cycles: dict[str, int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per round, one step of every variant in turn (a whole schedule cycle for variants whose steps
    differ, e.g. LookSAM k=5: the time is then the mean step of the cycle)."""
    cycles = cycles or {}
    device = x.device
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    peak: dict[str, float] = {}
    for r in range(warmup + rounds):
        for name, model, opt, scaler in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            n = max(1, cycles.get(name, 1))
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                one_step(model, opt, x, y, precision, scaler)
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) / n)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    return times, peak


def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def table(
    title: str, times: dict[str, list[float]], peak: dict[str, float], extra: dict[str, str] | None = None
) -> list[str]:
    extra = extra or {}
    head = "| variant | x SGD | x SAM | peak MB |" + (" note |" if extra else "")
    rows = [f"\n### {title}\n", head, "|---|---:|---:|---:|" + ("---|" if extra else "")]
    for name in times:
        x_sgd = f"{ratio(times, name, 'SGD'):.2f}" if "SGD" in times else "-"
        pk = f"{peak[name]:.0f}" if name in peak else "-"
        note = f" {extra.get(name, '')} |" if extra else ""
        rows.append(f"| {name} | {x_sgd} | {ratio(times, name, 'SAM'):.2f} | {pk} |{note}")
    return rows


# ---------------------------------------------------------------------------------------------- step-cost
def cmd_step_cost(args: argparse.Namespace, device: torch.device) -> list[str]:
    sc = _step_cost_module()
    name, width, batch = sc.parse_model(args.model)
    torch.manual_seed(0)
    proto = sc.create_model(name, num_classes=10, in_channels=3, width=width).to(device)
    scores = sc.scores_for(proto, args.scores, device)
    vs = [
        v
        for v in sc.variants(scores)
        if not args.only or v.name in ("SGD", "SAM") or any(o in v.name for o in args.only)
    ]
    g = torch.Generator().manual_seed(1)
    side = 8 if args.dry_run else 32  # CIFAR size; 8x8 in the dry run (CPU half-precision convs are slow)
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    runs = []
    for v in vs:
        model = sc.create_model(name, num_classes=10, in_channels=3, width=width).to(device)
        model.load_state_dict(proto.state_dict())
        model.train()
        scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        runs.append((v.name, model, v.build(model), scaler))
    cycles = {v.name: int(getattr(v, "cycle", 0) or 1) for v in vs}
    times, peak = interleaved(runs, x, y, args.precision, args.warmup, args.rounds, cycles)
    scale = ""
    if args.precision == "fp16":
        scale = ", GradScaler scales after the run: " + ", ".join(
            sorted({f"{s.get_scale():g}" for *_, s in runs if s is not None})
        )
    title = (
        f"{args.precision} autocast, {name} width={width or 'default'} batch={batch}, "
        f"rounds={args.rounds}, warmup={args.warmup}, mask scores={args.scores}{scale}"
    )
    return table(title, times, peak)


# ---------------------------------------------------------------------------------------------- implicit
def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, 16))


def output_2to4_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Random-score masks that keep 2 of every 4 weights along the *output* dimension of each hidden
    Linear weight (the layout the implicit form's dX kernel can use); other parameters unmasked."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for n, p in model.named_parameters():
        if p.dim() == 2 and p.shape[0] % 4 == 0:
            s = torch.rand(p.shape, generator=g).t().contiguous()  # (in, out): N:M along the last dim
            out[n] = select({n: s}, None, "2:4")[n].t().contiguous().to(p.device)
    return out


def cmd_implicit(args: argparse.Namespace, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    proto = mlp(args.width, args.depth).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g).to(device)
    y = torch.randint(0, 16, (args.batch,), generator=g).to(device)
    kw: dict[str, Any] = {"lr": 0.05, "momentum": 0.9}

    def build(kind: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
        def make(m: nn.Module) -> torch.optim.Optimizer:
            if kind == "SGD":
                return torch.optim.SGD(m.parameters(), **kw)
            if kind == "SAM":
                return SAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, **kw)
            opt = SSAM(m.parameters(), torch.optim.SGD, rho=0.1, mask=AllOnesMask(), model=m, form="implicit", **kw)
            opt.set_masks(output_2to4_masks(m))
            if kind.endswith("dense dX"):
                opt._sparse_ok = {p: False for p in opt._sparse_ok}  # same masks, the dense masked product
            return opt

        return make

    names = ["SGD", "SAM", "SSAM implicit 2:4 (sparse dX)", "SSAM implicit 2:4 (dense dX)"]
    runs, notes = [], {}
    for kind in names:
        model = mlp(args.width, args.depth).to(device)
        model.load_state_dict(proto.state_dict())
        opt = build(kind)(model)
        scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        runs.append((kind, model, opt, scaler))
        if isinstance(opt, SSAM):
            ok = sum(opt._sparse_ok.values())
            notes[kind] = f"{ok}/{len(opt._sparse_ok)} layers eligible for the 2:4 kernel"
    implicit_mod._warned_sparse = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        times, peak = interleaved(runs, x, y, args.precision, args.warmup, args.rounds)
    failed = [str(w.message) for w in caught if "2:4 sparse dX kernel unavailable" in str(w.message)]
    sparse = names[2]
    if failed:
        notes[sparse] += "; kernel FAILED, fell back to the dense product: " + failed[0]
    elif device.type == "cuda":
        notes[sparse] += "; no fallback warning (kernel ran where eligible)"
    title = (
        f"implicit form, {args.precision} autocast, MLP width={args.width} depth={args.depth} batch={args.batch}, "
        f"rounds={args.rounds}, warmup={args.warmup}"
    )
    return table(title, times, peak, notes)


# ---------------------------------------------------------------------------------------------- env
def cmd_env(args: argparse.Namespace, device: torch.device) -> list[str]:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
            ).stdout.strip()
            or "?"
        )
    except OSError:
        commit = "?"
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"none (CPU, {torch.get_num_threads()} threads)"
    )
    rows = [
        "## Machine\n",
        "| what | value |",
        "|---|---|",
        f"| device | {gpu} |",
        f"| torch | {torch.__version__} (CUDA {torch.version.cuda}) |",
        f"| python | {sys.version.split()[0]} |",
        f"| sparsam commit | {commit} |",
    ]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        rows += [f"| compute capability | {cap[0]}.{cap[1]} |", f"| device memory | {total:.0f} GiB |"]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("env", "step-cost", "implicit"))
    ap.add_argument("--out", required=True, help="Markdown file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, one round, CPU allowed: checks the setup only")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model", default="resnet18:64:128", help="step-cost: name:width:batch")
    ap.add_argument("--scores", choices=("fisher", "random"), default="fisher")
    ap.add_argument("--only", nargs="*", help="step-cost: substrings of variant names to keep")
    ap.add_argument("--width", type=int, default=4096, help="implicit: MLP width")
    ap.add_argument("--depth", type=int, default=4, help="implicit: hidden Linear layers")
    ap.add_argument("--batch", type=int, default=1024, help="implicit: batch size")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    if args.dry_run:
        args.rounds, args.warmup = 1, 0
        args.model, args.scores, args.width, args.depth, args.batch = "resnet18:4:8", "random", 64, 2, 8
        torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on a shared CPU
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --dry-run on a machine without a GPU)")
    rows = {"env": cmd_env, "step-cost": cmd_step_cost, "implicit": cmd_implicit}[args.command](args, device)
    if args.dry_run:
        rows = ["(dry run: tiny sizes, setup check only; these numbers mean nothing)", *rows]
    text = "\n".join(rows) + "\n"
    print(text, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
