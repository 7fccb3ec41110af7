"""The CIFAR-10 image folders the studies read, and a checksum manifest that says whether a copy is
the one the published numbers were measured on.

    python benchmarks/cifar_data.py build cifar-10-python.tar.gz OUT [--format png|jpeg] [--quality Q]
    python benchmarks/cifar_data.py manifest DIR [--out FILE]
    python benchmarks/cifar_data.py check DIR [--manifest FILE]

``build`` writes the official CIFAR-10 python archive (Krizhevsky, 2009; the ``cifar-10-python.tar.gz``
release with ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and ``batches.meta``) as
``OUT/{train,test}/<class name>/NNNN.<ext>``: one file per image, numbered per class in the
archive's order, class folders named by ``batches.meta``'s ``label_names`` (so sorted order is the
official label order). PNG (the default) is lossless; JPEG re-encodes and changes pixels.

``manifest`` hashes a folder: for each split the number of files and the SHA-256 of the sorted lines
``<path relative to the split> <SHA-256 of the file>``, and the same over all splits. ``check``
compares a folder with a manifest (default: ``cifar10-jpeg.manifest.json`` beside this script, the
JPEG copy the studies of docs/RESULTS.md used) and exits 1 naming the first split that differs.

The studies' numbers were measured on a JPEG re-encoding of the official images (a public mirror's
copy, slightly lossy). ``build`` from the official archive gives the lossless images, whose manifest
differs from that copy's: accuracies on it are close to, not equal to, the published ones.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "cifar10-jpeg.manifest.json"
SPLITS = ("train", "test")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _members(archive: Path) -> dict[str, Any]:
    """The archive's batches and meta, unpickled, keyed by file name (``data_batch_1``, ...)."""
    wanted = {*TRAIN_BATCHES, "test_batch", "batches.meta"}
    out: dict[str, Any] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name in wanted:
                f = tar.extractfile(m)
                assert f is not None  # a regular file always has a reader
                out[name] = pickle.load(io.BytesIO(f.read()), encoding="bytes")
    missing = sorted(wanted - set(out))
    if missing:
        raise SystemExit(f"{archive}: not the CIFAR-10 python archive (missing {', '.join(missing)})")
    return out


def build(archive: Path, out: Path, *, fmt: str = "png", quality: int = 95) -> dict[str, int]:
    """Write the archive's images as class folders under ``out``; returns the count per split."""
    import numpy as np
    from PIL import Image

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose a new folder")
    batches = _members(archive)
    names = [n.decode() for n in batches["batches.meta"][b"label_names"]]
    counts: dict[str, int] = {}
    for split, keys in (("train", TRAIN_BATCHES), ("test", ("test_batch",))):
        per_class = [0] * len(names)
        for key in keys:
            b = batches[key]
            data = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for img, label in zip(data, b[b"labels"]):
                folder = out / split / names[label]
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{per_class[label]:04d}.{'png' if fmt == 'png' else 'jpg'}"
                per_class[label] += 1
                if fmt == "png":
                    Image.fromarray(img).save(path, format="PNG")
                else:
                    Image.fromarray(img).save(path, format="JPEG", quality=quality)
        counts[split] = sum(per_class)
    return counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict[str, Any]:
    """File count and hash of the sorted (path, file hash) lines per split, and over all splits."""
    out: dict[str, Any] = {"format": 1, "splits": {}}
    total = hashlib.sha256()
    for split in SPLITS:
        root = folder / split
        if not root.is_dir():
            raise SystemExit(f"{folder}: no '{split}' folder (expected {folder}/{split}/<class>/<image>)")
        lines = sorted(f"{p.relative_to(root).as_posix()} {_sha256(p)}" for p in root.rglob("*") if p.is_file())
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        out["splits"][split] = {"files": len(lines), "sha256": digest}
        total.update(f"{split} {digest}\n".encode())
    out["sha256"] = total.hexdigest()
    return out


def check(folder: Path, manifest_path: Path) -> str | None:
    """None if ``folder`` matches the manifest, else a line naming the first split that differs."""
    want = json.loads(manifest_path.read_text())
    got = manifest(folder)
    for split in SPLITS:
        w, g = want["splits"][split], got["splits"][split]
        if w != g:
            return (
                f"{folder}/{split} differs from {manifest_path.name}: {g['files']} files (expected {w['files']}), "
                f"sha256 {g['sha256'][:12]}... (expected {w['sha256'][:12]}...)"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="image folders from the official CIFAR-10 python archive")
    b.add_argument("archive", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--format", choices=("png", "jpeg"), default="png")
    b.add_argument("--quality", type=int, default=95, help="JPEG quality (--format jpeg)")
    m = sub.add_parser("manifest", help="print (or write) a folder's manifest")
    m.add_argument("folder", type=Path)
    m.add_argument("--out", type=Path)
    c = sub.add_parser("check", help="compare a folder with a manifest (exit 1 if it differs)")
    c.add_argument("folder", type=Path)
    c.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        counts = build(args.archive, args.out, fmt=args.format, quality=args.quality)
        print(f"wrote {counts['train']} training and {counts['test']} test images to {args.out}")
    elif args.cmd == "manifest":
        text = json.dumps(manifest(args.folder), indent=2) + "\n"
        if args.out:
            args.out.write_text(text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
    else:
        problem = check(args.folder, args.manifest)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.folder} matches {args.manifest.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
