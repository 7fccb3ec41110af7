"""Per-rank bytes of SAM's extra state (the copy of w taken in first_step) under FSDP2 vs DDP.

Two gloo processes on the CPU run one SAM step on a CIFAR ResNet-18 (width 64, 11.2M parameters)
wrapped either in DDP or with ``fully_shard`` on each residual stage and the root; then every rank
counts the bytes of SAM's copy of ``w`` (``opt._backup``) and of the parameters it holds. Bytes are
counted, not timed, so the numbers do not depend on the machine's load.

    python benchmarks/fsdp_memory.py [--width 64] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsam import SAM
from sparsam.models import create_model
from sparsam.optim._sharded import local_numel_bytes


def _worker(rank: int, world: int, port: int, width: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = {}
        for mode in ("ddp", "fsdp2"):
            torch.manual_seed(0)
            model = create_model("resnet18", num_classes=10, in_channels=3, width=width)
            if mode == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import fully_shard

                for name in ("layer1", "layer2", "layer3", "layer4"):
                    fully_shard(getattr(model, name))
                fully_shard(model)
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model, ascent="sync")
            g = torch.Generator().manual_seed(rank)
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)

            def closure(model=model, x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            rows[mode] = {
                "backup": sum(b.numel() * b.element_size() for b in opt._backup.values()),
                "params": local_numel_bytes(model.parameters()),
                "momentum": local_numel_bytes(s["momentum_buffer"] for s in opt.state.values()),
            }
        torch.save(rows, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(world, port, args.width, tmp), nprocs=world)
        ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    mib = 2**20
    lines = [
        f"SAM's extra state per rank, CIFAR ResNet-18 width {args.width}, 2 ranks (gloo, CPU), bytes counted\n",
        "| rank | DDP: copy of w (MiB) | FSDP2: copy of w (MiB) | FSDP2 / DDP | FSDP2: parameters held (MiB) | FSDP2: momentum (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r, row in enumerate(ranks):
        d, f = row["ddp"], row["fsdp2"]
        lines.append(
            f"| {r} | {d['backup'] / mib:.2f} | {f['backup'] / mib:.2f} | {f['backup'] / d['backup']:.3f} | "
            f"{f['params'] / mib:.2f} | {f['momentum'] / mib:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
