"""What one training step costs: SGD, SAM, ASAM and the SSAM variants, side by side.

Every round runs one step of every variant in turn (A B C ... A B C ...), after warm-up steps, so
slow drifts of the machine hit all variants alike. Ratios are medians over rounds of the per-round
ratio (variant / SGD and variant / SAM). Columns:

  x SGD, x SAM    time of a whole training step (both passes and the optimizer), as ratios
  opt/fb          optimizer-only time (first_step + second_step, no forward/backward) divided by
                  one SGD forward+backward of the same batch
  opt x SGD       the same optimizer-only time divided by SGD's ``opt.step()`` of the same round
  state MB        SAM/SSAM's own extra state: the copy of w for the perturbed tensors + masks
                  (bool, 1 byte/coordinate); the base optimizer's state is the same for all
  peak MB         peak device memory of the step (CUDA only; '-' on the CPU)

Variants named "+cheap" use norm="masked" with the cheaper ascent pass (sparse_ascent=True):
parameters whose mask is all False get no weight gradient in pass 1 and the backward stops below
the lowest perturbed layer. The others are the authors' configuration (norm="full", dense pass 1).
Masks come from the diagonal Fisher of the freshly initialised model on random inputs (pattern
and budget as in the papers), or random scores with --scores random. "deepest tensors s=0.9" is
not score-based: whole tensors from the output side covering 10% of the coordinates, to show what
the cheaper pass saves when nothing near the input is perturbed (Fisher's tensor-level pick at
s=0.9 includes the small early tensors, so its backward still runs to the input).

The cheaper SAMs of docs/variants.md ("SAM every 2", "SAM ascent_fraction 0.25", "LookSAM k=5",
"LookSSAM k=5", "ESAM") are driven through ``opt.step(closure)`` with the closure of the pass
contract; one round times a whole cycle of their schedule (2 steps, 1, 5, 5 and 1) and divides by
its length, so "x SAM" is the mean cost of a step. LookSSAM (``--opt lookssam``, the preset
lookssam-f) is LookSAM k=5 on the mask of "SSAM unstructured s=0.5" (norm="full", dense pass 1). Their optimizer-only time is not separable from the passes ("-").

"MSAM" (Momentum-SAM, rho 3 as in its paper) and "sparse MSAM s=0.5" (on the mask of "SSAM
unstructured s=0.5", norm="full") run one pass per step: first_step (perturb along the momentum),
forward+backward at the perturbed weights, second_step (restore, SGD step). Their opt/fb is
first_step + second_step over SGD's forward+backward; "opt x SGD" is that optimizer-only work
against ``SGD.step``.

    python benchmarks/step_cost.py                       # the full matrix (long on a CPU)
    python benchmarks/step_cost.py --models resnet18:16:32 --rounds 5   # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import AllOnesMask, select
from sparsam.models import create_model

DEFAULT_MODELS = "resnet18:16:128,resnet18:16:32,resnet18:64:128,resnet18:64:32,wrn16-4:-:128"


@dataclass
class Variant:
    name: str
    build: Callable[[nn.Module], torch.optim.Optimizer]
    cycle: int = 0  # > 0: driven through opt.step(closure), timed over this many steps (a schedule's cycle)


def parse_model(spec: str) -> tuple[str, int | None, int]:
    try:
        name, width, batch = spec.split(":")
        return name, (None if width in ("-", "") else int(width)), int(batch)
    except ValueError:
        raise SystemExit(
            f"bad --models entry {spec!r}: use name:width:batch, e.g. resnet18:16:128 (width '-' = default)"
        ) from None


def scores_for(model: nn.Module, kind: str, device: torch.device) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters()}
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        return {n: torch.rand(p.shape, generator=g).to(device) for n, p in named.items()}
    from sparsam.masks import fisher_information

    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1)).to(device)
    return fisher_information(model, F.cross_entropy, [(x, y)], num_samples=128)


def norm_layer_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    out = {}
    for mn, mod in model.named_modules():
        if isinstance(mod, norms):
            for pn, p in mod.named_parameters(recurse=False):
                out[f"{mn}.{pn}" if mn else pn] = torch.ones_like(p, dtype=torch.bool)
    return out


def deepest_tensor_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Whole tensors from the output side (parameter order reversed) until ``1 - sparsity`` of the
    coordinates are covered: a structured mask chosen by depth instead of by score, so the cheaper
    ascent pass can stop the backward early."""
    total = sum(t.numel() for t in scores.values())
    out, covered = {}, 0
    for n in reversed(list(scores)):
        if covered >= (1 - sparsity) * total:
            break
        out[n] = torch.ones_like(scores[n], dtype=torch.bool)
        covered += scores[n].numel()
    return out


def variants(scores: dict[str, torch.Tensor]) -> list[Variant]:
    base_kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    conv_linear = {n: s for n, s in scores.items() if s.dim() > 1}

    def sgd(model):
        return torch.optim.SGD(model.parameters(), **base_kw)

    def sam(model, adaptive=False):
        return SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, model=model, **base_kw)

    def ssam(masks_fn, cheap, form="explicit"):
        def build(model):
            opt = SSAM(
                model.parameters(),
                torch.optim.SGD,
                rho=0.1,
                mask=AllOnesMask(),
                model=model,
                form=form,
                norm="masked" if cheap else "full",
                sparse_ascent=cheap,
                **base_kw,
            )
            opt.set_masks(masks_fn(model))
            return opt

        return build

    out = [Variant("SGD", sgd), Variant("SAM", sam), Variant("ASAM", lambda m: sam(m, adaptive=True))]
    specs: list[tuple[str, Callable[[nn.Module], dict]]] = []
    for s in (0.5, 0.9, 0.99):
        specs.append((f"SSAM unstructured s={s}", lambda m, s=s: select(scores, s)))
    for gran in ("tensor", "channel"):
        for s in (0.5, 0.9):
            specs.append(
                (
                    f"SSAM structured/{gran} s={s}",
                    lambda m, s=s, gran=gran: select(scores, s, "structured", granularity=gran),
                )
            )
    specs.append(("SSAM N:M 2:4", lambda m: select(scores, None, "2:4")))
    specs.append(("SSAM norm-layers-only", norm_layer_masks))
    specs.append(("SSAM deepest tensors s=0.9", lambda m: deepest_tensor_masks(scores, 0.9)))
    for name, fn in specs:
        out.append(Variant(name, ssam(fn, cheap=False)))
        out.append(Variant(name + " +cheap", ssam(fn, cheap=True)))
    out.append(
        Variant("SSAM implicit 2:4", ssam(lambda m: select(conv_linear, None, "2:4"), cheap=False, form="implicit"))
    )
    out += cheap_variants(base_kw, scores)
    out += msam_variants(base_kw, scores)
    return out


def msam_variants(base_kw: dict, scores: dict[str, torch.Tensor]) -> list[Variant]:
    """Momentum-SAM, dense and on SSAM-F's 50% mask: one pass per step."""
    from sparsam import MSAM, SparseMSAM

    def sparse(m):
        opt = SparseMSAM(m.parameters(), torch.optim.SGD, rho=3.0, mask=AllOnesMask(), model=m, **base_kw)
        opt.set_masks(select(scores, 0.5))
        return opt

    return [
        Variant("MSAM", lambda m: MSAM(m.parameters(), torch.optim.SGD, rho=3.0, model=m, **base_kw)),
        Variant("sparse MSAM s=0.5", sparse),
    ]


def cheap_variants(base_kw: dict, scores: dict[str, torch.Tensor]) -> list[Variant]:
    """The cheaper SAMs of docs/variants.md, with the settings of their presets."""
    from sparsam.optim.esam import ESAM
    from sparsam.optim.looksam import LookSAM, LookSSAM
    from sparsam.optim.schedule import ScheduledSAM

    def lookssam(m):  # the preset lookssam-f: SSAM-F's sparsity 0.5, LookSAM's k = 5 (alpha 0.7)
        opt = LookSSAM(m.parameters(), torch.optim.SGD, rho=0.1, mask=AllOnesMask(), model=m, k=5, **base_kw)
        opt.set_masks(select(scores, 0.5))
        return opt

    return [
        Variant(
            "SAM every 2",
            lambda m: ScheduledSAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, every=2, **base_kw),
            2,
        ),
        Variant(
            "SAM ascent_fraction 0.25",
            lambda m: ScheduledSAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, ascent_fraction=0.25, **base_kw),
            1,
        ),
        Variant("LookSAM k=5", lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, k=5, **base_kw), 5),
        Variant("LookSSAM k=5 s=0.5", lookssam, 5),
        Variant(
            "ESAM beta=0.6 gamma=0.5",
            lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.05, model=m, beta=0.6, gamma=0.5, **base_kw),
            1,
        ),
    ]


def contract_closure(opt, model, x, y):
    """The closure of the pass contract (docs/variants.md): sub-batch ascent, ESAM's selection,
    per-sample losses and the forward-only measuring pass."""

    def closure():
        if opt.current_pass == "measure":
            opt.record_sample_losses(F.cross_entropy(model(x), y, reduction="none"))
            return None
        idx = opt.batch_index
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        n = math.ceil(opt.batch_fraction * xb.shape[0])
        losses = F.cross_entropy(model(xb[:n]), yb[:n], reduction="none")
        if opt.wants_sample_losses:
            opt.record_sample_losses(losses)
        loss = losses.mean()
        loss.backward()
        return loss

    return closure


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing needs the queued kernels finished


def timed_step(model, opt, x, y, device, cycle: int = 0) -> tuple[float, float, float]:
    """(whole step, optimizer-only part, forward+backward of the clean pass) in seconds; with
    ``cycle``: (mean step over a cycle of ``opt.step(closure)`` calls, nan, nan)."""
    sync(device)
    t0 = time.perf_counter()
    if cycle:
        closure = contract_closure(opt, model, x, y)
        for _ in range(cycle):
            opt.zero_grad()
            opt.step(closure)
        sync(device)
        return (time.perf_counter() - t0) / cycle, math.nan, math.nan
    if not isinstance(opt, SAM):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, t1 - t0
    if not opt.ascends_next():  # MSAM: perturb, the one pass at w~, restore + base step
        opt.zero_grad()
        opt.first_step()
        sync(device)
        t1 = time.perf_counter()
        with opt.descent_pass():
            F.cross_entropy(model(x), y).backward()
        sync(device)
        t2 = time.perf_counter()
        opt.second_step(zero_grad=True)
        sync(device)
        t3 = time.perf_counter()
        return t3 - t0, (t1 - t0) + (t3 - t2), t2 - t1
    opt.zero_grad()
    with opt.ascent_pass():
        F.cross_entropy(model(x), y).backward()
    sync(device)
    t1 = time.perf_counter()
    opt.first_step(zero_grad=True)
    sync(device)
    t2 = time.perf_counter()
    with opt.descent_pass():
        F.cross_entropy(model(x), y).backward()
    sync(device)
    t3 = time.perf_counter()
    opt.second_step(zero_grad=True)
    sync(device)
    t4 = time.perf_counter()
    return t4 - t0, (t2 - t1) + (t4 - t3), t1 - t0


def extra_state_mb(opt) -> float:
    if not isinstance(opt, SAM):
        return 0.0
    b = sum(t.numel() * t.element_size() for t in opt._backup.values())
    b += sum(t.numel() * t.element_size() for t in getattr(opt, "_gv", {}).values())  # LookSAM's stored g_v
    if isinstance(opt, SSAM):
        b += sum(m.numel() for m in opt._masks.values())  # bool: one byte per coordinate
    return b / 2**20


def bench_model(spec: str, args, device: torch.device) -> list[str]:
    name, width, batch = parse_model(spec)
    torch.manual_seed(0)
    proto = create_model(name, num_classes=10, in_channels=3, width=width).to(device)
    if args.channels_last:
        proto = proto.to(memory_format=torch.channels_last)
    scores = scores_for(proto, args.scores, device)
    vs = [
        v for v in variants(scores) if not args.only or any(o in v.name for o in args.only) or v.name in ("SGD", "SAM")
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    runs = []
    for v in vs:
        model = create_model(name, num_classes=10, in_channels=3, width=width).to(device)
        model.load_state_dict(proto.state_dict())
        model.train()
        runs.append((v, model, v.build(model)))
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    opt_t: dict[str, list[float]] = {v.name: [] for v in vs}
    fb_t: list[float] = []
    peak: dict[str, float] = {}
    for r in range(args.warmup + args.rounds):
        for v, model, opt in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            total, o, fb = timed_step(model, opt, x, y, device, v.cycle)
            if device.type == "cuda":
                peak[v.name] = max(peak.get(v.name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            if r >= args.warmup:
                times[v.name].append(total)
                opt_t[v.name].append(o)
                if v.name == "SGD":
                    fb_t.append(fb)
        print(f"  {spec}: round {r + 1}/{args.warmup + args.rounds} done", file=sys.stderr, flush=True)
    n = args.rounds
    sam_state = extra_state_mb(runs[1][2])
    rows = [
        f"\n### {name} width={width or 'default'} batch={batch} ({sum(p.numel() for p in proto.parameters()) / 1e6:.2f}M params)\n",
        "| variant | x SGD | x SAM | opt/fb | opt x SGD | state MB | state / SAM | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, model, opt in runs:
        ts = times[v.name]
        x_sgd = statistics.median(ts[i] / times["SGD"][i] for i in range(n))
        x_sam = statistics.median(ts[i] / times["SAM"][i] for i in range(n))
        ofb = statistics.median(opt_t[v.name][i] / fb_t[i] for i in range(n)) if not v.cycle else math.nan
        osgd = statistics.median(opt_t[v.name][i] / opt_t["SGD"][i] for i in range(n)) if not v.cycle else math.nan
        st = extra_state_mb(opt)
        rel = f"{st / sam_state:.2f}" if sam_state else "-"
        pk = f"{peak[v.name]:.0f}" if v.name in peak else "-"
        ofb_s = "-" if math.isnan(ofb) else f"{ofb:.3f}"
        osgd_s = "-" if math.isnan(osgd) else f"{osgd:.2f}"
        rows.append(f"| {v.name} | {x_sgd:.2f} | {x_sam:.2f} | {ofb_s} | {osgd_s} | {st:.1f} | {rel} | {pk} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated name:width:batch")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scores", choices=("fisher", "random"), default="fisher")
    ap.add_argument("--only", nargs="*", help="substrings of variant names to keep (SGD and SAM are always kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    head = [
        "## Step cost (medians of per-round ratios; interleaved variants)\n",
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
        f"torch {torch.__version__}, rounds={args.rounds}, warmup={args.warmup}, mask scores={args.scores}",
    ]
    lines = list(head)
    print("\n".join(head), flush=True)
    for spec in args.models.split(","):
        rows = bench_model(spec.strip(), args, device)
        print("\n".join(rows), flush=True)
        lines += rows
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
