"""``sparsam analyze``: Hessian spectra, loss landscapes, sharpness and mask densities of trained runs.

Each argument is a run directory (``sparsam train``/``sweep`` output), a folder searched for run
directories, or a checkpoint file (``checkpoint.pt``, or ``best_model.pt`` beside its
``config.json``). The model is rebuilt from the run's saved configuration, its weights loaded, and
every measure is computed on the same fixed batches of the run's own data (test split by default,
no augmentation) with the plain mean cross-entropy, in eval mode (BatchNorm uses its running
statistics) unless ``--mode train``. Random draws (Lanczos start vectors, landscape directions) come
from ``--seed``, so runs are compared on equal terms. The numbers go to ``results.json`` and
``summary.md``, the figures (PNG and PDF) beside them, through ``sparsam.analysis.write_report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..train.errors import ConfigError, UserError
from ._args import Parser

_WEIGHT_FILES = {"final": "checkpoint.pt", "best": "best_model.pt"}


@dataclasses.dataclass
class Target:
    """One model to analyse: a name for tables, its run directory (if any) and weight file."""

    name: str
    run_dir: Path | None
    weights: Path


def resolve_targets(paths: list[str], weights: str) -> list[Target]:
    """Run directories, folders of runs and checkpoint files -> one ``Target`` each."""
    from ..runs.rundir import CONFIG, find_runs

    targets: list[Target] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{raw}: no such file or directory")
        if p.is_file():
            targets.append(Target(p.parent.name or p.stem, p.parent if (p.parent / CONFIG).is_file() else None, p))
            continue
        runs = find_runs([raw])
        if not runs:
            raise UserError(f"{raw}: no run directories (folders with {CONFIG}) found")
        for run in runs:
            f = run / _WEIGHT_FILES[weights]
            if not f.is_file() and weights == "best" and (run / _WEIGHT_FILES["final"]).is_file():
                f = run / _WEIGHT_FILES["final"]  # a run without an evaluation yet: its last weights
            if not f.is_file():
                raise UserError(f"{run}: no {_WEIGHT_FILES[weights]} (the run has not finished an epoch yet)")
            targets.append(Target(run.name, run, f))
    # Unique names: a clash gets the parent folder's name in front.
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.name] = counts.get(t.name, 0) + 1
    for t in targets:
        if counts[t.name] > 1:
            base = t.run_dir if t.run_dir is not None else t.weights.parent
            t.name = f"{base.parent.name}/{t.name}" + (
                "" if t.weights.name == "checkpoint.pt" else f":{t.weights.stem}"
            )
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise UserError(f"{t.name} is given twice")
        seen.add(t.name)
    return targets


def _load(target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
    """(saved configuration dict, checkpoint dict) of a target."""
    from ..runs.checkpoint import read_torch_file
    from ..train.errors import CheckpointError
    from ..runs.rundir import CONFIG, read_run_config

    try:  # checkpoint.pt (sparsam training checkpoint) or best_model.pt ({"model", "epoch", "test_acc"})
        ckpt = read_torch_file(target.weights, map_location="cpu")
    except CheckpointError as e:  # truncated, damaged (CRC), or unsafe to load: never suggests weights_only=False
        raise UserError(f"not a readable sparsam checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{target.weights}: not a sparsam checkpoint (no 'model' entry)")
    if isinstance(ckpt.get("config"), dict):
        return ckpt["config"], ckpt
    if target.run_dir is not None:
        return dict(read_run_config(target.run_dir)["config"]), ckpt
    raise UserError(f"{target.weights}: holds no configuration and has no {CONFIG} beside it")


def _named_masks(ckpt: dict[str, Any], model: Any) -> dict[str, Any] | None:
    """The SSAM masks saved in the checkpoint's optimizer state, by parameter name (``None`` if the
    run was not SSAM). The engine builds the optimizer over ``model.parameters()`` in one group, so
    mask index i is the i-th named parameter; shapes are checked."""
    extra = (ckpt.get("optimizer") or {}).get("sparsam") or {}
    masks = extra.get("masks")
    if not masks:
        return None
    import torch

    named = list(model.named_parameters())
    out: dict[str, Any] = {}
    for i, m in masks.items():
        i = int(i)
        if i >= len(named) or tuple(named[i][1].shape) != tuple(m.shape):
            return None  # not the engine's layout: no per-layer densities rather than wrong ones
        out[named[i][0]] = m.bool()
    # A parameter without a mask is not perturbed.
    return {n: out.get(n, torch.zeros(p.shape, dtype=torch.bool)) for n, p in named}


def _method_styles(targets: list[Target]) -> dict[str, Any]:
    """{run name: the project's colour and words for its method} of the targets with a saved
    configuration (the figures give the others colours of their own)."""
    from ..runs.figures import method_styles
    from ..runs.rundir import read_run_config

    named = []
    for t in targets:
        if t.run_dir is not None and (t.run_dir / "config.json").is_file():
            try:
                named.append((t.name, dict(read_run_config(t.run_dir)["config"])))
            except (OSError, ValueError, KeyError):  # an unreadable config costs the run only its colour
                continue
    return dict(zip((n for n, _ in named), method_styles([c for _, c in named]))) if named else {}


def analyze_target(target: Target, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Every measure asked for, on one model; the dict ``sparsam.analysis.write_report`` takes."""
    import torch
    from torch import nn

    from .. import analysis
    from ..data.device_loader import DeviceLoader
    from ..models import create_model
    from ..train.config import build_config
    from ..train.loaders import build_data
    from ..runs.rundir import read_metrics

    saved, ckpt = _load(target)
    try:
        cfg = build_config([(f"the configuration of {target.weights}", saved)])
    except ConfigError as e:
        raise UserError(f"{target.weights}: its saved configuration is not valid here: {e}") from None
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dataclasses.replace(cfg, eval_batch_size=args.batch_size, batch_size=min(cfg.batch_size, args.batch_size))
    data = build_data(cfg, device=device, batch_per_rank=cfg.batch_size)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{target.weights}: the weights do not fit the model of its configuration ({e})") from None
    model.to(device)
    model.train(args.mode == "train")
    if args.split == "test":
        batches: Any = data.test
    elif data.mode == "memory":  # the training images, without augmentation
        batches = DeviceLoader(
            data.train.dataset,
            batch_size=args.batch_size,
            shuffle=True,
            seed=args.seed,
            device=device,
            mean=data.info["mean"],
            std=data.info["std"],
            channels_last=cfg.channels_last,
        )
    else:
        batches = data.fisher
    loss_fn = nn.CrossEntropyLoss()
    common = dict(device=device, n_batches=args.batches)
    r: dict[str, Any] = {
        "weights": str(target.weights),
        "epoch": ckpt.get("epoch"),
        "split": args.split,
        "samples": None,
        "mode": args.mode,
    }
    # One fixed list of batches, reused by every measure (a loader is read once by each tool).
    from ..analysis._common import collect_batches

    fixed = [(x, y) for x, y, _ in collect_batches(batches, device=device, n_batches=args.batches)]
    r["samples"] = sum(int(y.shape[0]) for _, y in fixed)
    t0 = time.perf_counter()
    r["loss"] = analysis.mean_loss(model, loss_fn, fixed, **common)
    if args.top_k:
        r["top_eigenvalues"] = analysis.top_eigenvalues(
            model, loss_fn, fixed, k=args.top_k, n_iter=args.eig_iters, tol=args.tol, generator=args.seed, **common
        )
    if args.trace_samples:
        r["trace"] = analysis.hessian_trace(
            model, loss_fn, fixed, n_samples=args.trace_samples, generator=args.seed, **common
        )
    if args.density_iters:
        r["spectral_density"] = analysis.spectral_density(
            model, loss_fn, fixed, n_iter=args.density_iters, generator=args.seed, **common
        )
    if args.rho > 0:
        r["sharpness"] = analysis.sam_sharpness(
            model, loss_fn, fixed, rho=args.rho, n_steps=args.sharpness_steps, **common
        )
    if args.points:
        grid = torch.linspace(-args.range, args.range, args.points).tolist()
        r["landscape_1d"] = analysis.loss_landscape_1d(
            model, loss_fn, fixed, alphas=grid, generator=args.seed, **common
        )
    if args.surface:
        grid = torch.linspace(-args.range, args.range, args.surface).tolist()
        r["landscape_2d"] = analysis.loss_landscape_2d(
            model, loss_fn, fixed, alphas=grid, betas=grid, generator=args.seed, **common
        )
    r["analysis_time_s"] = time.perf_counter() - t0
    if target.run_dir is not None:
        r["metrics"] = read_metrics(target.run_dir) or None
    masks = _named_masks(ckpt, model)
    if masks is not None:
        r["mask_density"] = {n: float(m.float().mean()) for n, m in masks.items() if m.numel()}
    say(
        f"{target.name}: "
        + ", ".join(
            f"{k} {v:.4g}"
            for k, v in (
                ("loss", r["loss"]),
                ("top eigenvalue", (r.get("top_eigenvalues") or [None])[0]),
                ("trace", r.get("trace")),
                ("sharpness", r.get("sharpness")),
            )
            if v is not None
        )
        + f" ({r['analysis_time_s']:.1f} s)"
    )
    return r


def _positive(kind: type, *, zero_ok: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v < 0 or (v == 0 and not zero_ok) or v != v:
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero_ok else '> 0'}, got {text!r}")
        return v

    return parse


def main(argv: list[str], prog: str = "sparsam analyze") -> int:
    parser = Parser(  # one-line errors with 'did you mean', as train and sweep
        prog=prog,
        description=__doc__.split("\n\n")[1].replace("``", "`").replace(":func:", ""),
        epilog="examples:\n"
        "  sparsam analyze runs/sgd runs/sam                     # top eigenvalue, sharpness, 1-D landscape\n"
        "  sparsam analyze runs/sweep --top-k 3 --surface 21     # every run under a folder, plus 2-D surfaces\n"
        "  sparsam analyze runs/ssam/best_model.pt --trace-samples 50 --density-iters 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_CHECKPOINT",
        help="run directories, folders holding them, or checkpoint files",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where results.json, summary.md and the figures go (default: beside the runs read, in the folder "
        "holding every given path: RUN/analysis for one run directory, the checkpoint's folder for a file)",
    )
    parser.add_argument(
        "--weights",
        choices=tuple(_WEIGHT_FILES),
        default="final",
        help="final (checkpoint.pt) or best (best_model.pt) weights of a run directory (default: final)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="data the measures use, without augmentation (default: test)",
    )
    parser.add_argument(
        "--mode",
        choices=("eval", "train"),
        default="eval",
        help="model mode: eval = BatchNorm running statistics (default), train = batch statistics",
    )
    parser.add_argument("--batch-size", type=_positive(int), default=256, help="samples per batch (default: 256)")
    parser.add_argument(
        "--batches", type=_positive(int), default=1, help="batches every measure uses, the same for all (default: 1)"
    )
    parser.add_argument(
        "--top-k",
        type=_positive(int, zero_ok=True),
        default=1,
        help="top Hessian eigenvalues, Lanczos (0: skip; default: 1)",
    )
    parser.add_argument("--eig-iters", type=_positive(int), default=100, help="Lanczos steps per eigenvalue at most")
    parser.add_argument("--tol", type=_positive(float), default=1e-3, help="relative tolerance of the eigenvalues")
    parser.add_argument(
        "--trace-samples",
        type=_positive(int, zero_ok=True),
        default=0,
        help="Hutchinson samples for the Hessian trace (0: skip; default)",
    )
    parser.add_argument(
        "--density-iters",
        type=_positive(int, zero_ok=True),
        default=0,
        help="Lanczos steps of the spectral density (0: skip; default)",
    )
    parser.add_argument(
        "--rho",
        type=_positive(float, zero_ok=True),
        default=0.05,
        help="radius of the SAM sharpness (0: skip; default: 0.05)",
    )
    parser.add_argument("--sharpness-steps", type=_positive(int), default=1, help="ascent steps of the sharpness")
    parser.add_argument(
        "--points",
        type=_positive(int, zero_ok=True),
        default=21,
        help="points of the 1-D landscape along a filter-normalised random direction (0: skip)",
    )
    parser.add_argument(
        "--surface",
        type=_positive(int, zero_ok=True),
        default=0,
        help="points per side of a 2-D landscape (0: skip; default; 21 costs 441 evaluations)",
    )
    parser.add_argument("--range", type=_positive(float), default=1.0, help="landscape coordinates from -R to R")
    parser.add_argument(
        "--seed", type=_positive(int, zero_ok=True), default=0, help="seed of the start vectors and directions"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=_positive(int), help="CPU threads for PyTorch")
    parser.add_argument(
        "--format",
        "--formats",
        dest="formats",
        default="png,pdf",
        metavar="LIST",
        help="figure formats, comma-separated: png, pdf, svg (default png,pdf)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    from .report import default_out, parse_formats

    formats = parse_formats(args.formats)
    if args.points == 1 or args.surface == 1:
        raise UserError("--points and --surface need at least 2 points (or 0 to skip)")
    import torch

    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = resolve_targets(args.paths, args.weights)
    from ..runs.rundir import load_run, resolve_dir

    for t in targets:  # every run file checked before any work: the first bad line or key stops here
        if t.run_dir is not None:
            load_run(t.run_dir)
    out = Path(args.out) if args.out else default_out(args.paths, "analysis")  # beside the runs read
    out = resolve_dir(out, flag="--out")  # a file, or a path under one, is refused before any work

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results = {t.name: analyze_target(t, args, say) for t in targets}
    from ..analysis import write_report

    written = write_report(results, out, formats=formats, styles=_method_styles(targets))
    if not args.quiet:
        print((out / "summary.md").read_text(encoding="utf-8"))
        say(f"wrote {os.path.abspath(out)}: {', '.join(p.name for p in written)}")
    return 0
