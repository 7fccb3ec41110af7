"""How much do two Fisher masks agree? The papers' preset mask against itself and the library default.

On a CIFAR ResNet-18 (``sparsam.models``, width 16 by default) and real CIFAR-10 images, this
computes unstructured SSAM-F masks at sparsity 0.5 and reports Jaccard overlaps
``|A ∩ B| / |A ∪ B|`` (two independent uniformly random masks of density d overlap d / (2 - d),
1/3 at d = 0.5):

* ``preset`` mask: the papers' presets (``cifar10-resnet18-ssam-f``): BatchNorm normalises each
  sample with its own statistics (``bn_stats="sample"``, model in train mode, as the authors'
  batch-1 passes), Fisher samples drawn from the *augmented* training images (crop + flip +
  Cutout), Ns = the preset's ``num_samples``.
* ``noise floor``: preset mask vs a second preset mask from fresh samples (same weights).
* ``default``: the library default, ``bn_stats="running"`` on un-augmented images; overlap of the
  preset mask with it, and the default's own noise floor.
* ``structured density``: the fraction of coordinates a whole-tensor (structured) mask of the preset
  Fisher keeps with the authors' ``fill="overshoot"`` and with sparsam's ``fill="first-fit"``.

Each is measured at initialisation and after ``--train-epochs`` epochs of plain SGD on the loaded
images (so that the running statistics are no longer (0, 1)), averaged over ``--repeats``
independent draws. Images are decoded with PIL from a folder ``ROOT/train/<class>/*.jpg``.

    nice -n 19 python benchmarks/fisher_overlap.py --data /work/shared/data/cifar10-jpeg

Use ``--per-class 4 --num-samples 4 --repeats 1 --train-epochs 0`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsam.data.augment import cifar_augment
from sparsam.masks import fisher_information, select
from sparsam.models import create_model


def load_images(root: Path, per_class: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class of ``root/train`` (sorted, from ``offset``) as uint8 NCHW."""
    from PIL import Image

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted((root / "train" / name).glob("*.jpg"))[offset : offset + per_class]
        if len(files) < per_class:
            raise SystemExit(f"{root / 'train' / name} has fewer than {offset + per_class} images")
        for f in files:
            with Image.open(f) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            xs.append(arr.reshape(32, 32, 3).permute(2, 0, 1))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10-jpeg"))
    ap.add_argument("--per-class", type=int, default=40, help="images per class (10 classes)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument(
        "--num-samples",
        type=int,
        nargs="+",
        default=[16, 128],
        help="Ns values (16: the cifar10 presets, NeurIPS README; 128: TPAMI README, ImageNet)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if not args.data.is_dir():
        print(f"error: no image folder at {args.data}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    images, labels = load_images(args.data, args.per_class, 0)
    mean = images.float().mean(dim=(0, 2, 3), keepdim=True)
    std = images.float().std(dim=(0, 2, 3), keepdim=True)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def batch(idx: torch.Tensor, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = images[idx]
        if augment:
            x = cifar_augment(x, generator=gen)
        return (x.float() - mean) / std, labels[idx]

    model = create_model("resnet18", num_classes=10, width=args.width)
    loss_fn = F.cross_entropy
    results: dict[str, dict[str, float]] = {}

    def measure(state: str) -> None:
        for ns in args.num_samples:
            if ns > images.shape[0]:
                raise SystemExit(f"--num-samples {ns} needs at least {ns} images (have {images.shape[0]})")
            rows: dict[str, list[float]] = {
                "noise_floor_preset": [],
                "preset_vs_default": [],
                "noise_floor_default": [],
                "structured_overshoot_density": [],
                "structured_first_fit_density": [],
            }
            for _ in range(args.repeats):
                masks = {}
                for tag in ("preset_a", "preset_b", "default_a", "default_b"):
                    idx = torch.randperm(images.shape[0], generator=gen)[:ns]
                    preset = tag.startswith("preset")
                    x, y = batch(idx, augment=preset)
                    model.train()
                    fisher = fisher_information(
                        model, loss_fn, [(x, y)], ns, bn_stats="sample" if preset else "running"
                    )
                    masks[tag] = select(fisher, args.sparsity)
                    if tag == "preset_a":  # whole-tensor masks of the same Fisher: the two fills
                        for fill in ("overshoot", "first-fit"):
                            m = select(fisher, args.sparsity, "structured", fill=fill)
                            total = sum(t.numel() for t in m.values())
                            rows[f"structured_{fill.replace('-', '_')}_density"].append(
                                sum(int(t.sum()) for t in m.values()) / total
                            )
                rows["noise_floor_preset"].append(jaccard(masks["preset_a"], masks["preset_b"]))
                rows["preset_vs_default"].append(jaccard(masks["preset_a"], masks["default_a"]))
                rows["noise_floor_default"].append(jaccard(masks["default_a"], masks["default_b"]))
            key = f"{state}, Ns={ns}"
            results[key] = {k: sum(v) / len(v) for k, v in rows.items()}
            r = results[key]
            print(
                f"{key:<22} noise floor (preset) {r['noise_floor_preset']:.3f}   preset vs default "
                f"{r['preset_vs_default']:.3f}   noise floor (default) {r['noise_floor_default']:.3f}   "
                f"structured density: overshoot {r['structured_overshoot_density']:.3f}, first-fit "
                f"{r['structured_first_fit_density']:.3f}",
                flush=True,
            )

    d = 1.0 - args.sparsity
    print(
        f"ResNet-18 width {args.width}, {images.shape[0]} CIFAR-10 training images, sparsity {args.sparsity}, "
        f"{args.repeats} repeat(s); two random masks overlap {d / (2 - d):.3f}",
        flush=True,
    )
    measure("init")
    if args.train_epochs > 0:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(args.train_epochs):
            for idx in torch.randperm(images.shape[0], generator=gen).split(32):
                x, y = batch(idx, augment=True)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        measure(f"after {args.train_epochs} SGD epochs")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
