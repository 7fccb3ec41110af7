"""Per-rank bytes of SAM's extra state (the copy of w taken in first_step) under FSDP2 vs DDP, and
the optimizer's own time there.

Two gloo processes on the CPU build a CIFAR ResNet-18 (width 64, 11.2M parameters) twice, wrapped
in DDP and with ``fully_shard`` on each residual stage and the root, and run one SAM step on each;
then every rank counts the bytes of SAM's copy of ``w`` (``opt._backup``) and of the parameters it
holds. Bytes are counted, not timed, so those numbers do not depend on the machine's load.

Then, with the last step's gradients in place (no forward or backward runs), every round times
``first_step + second_step`` of the DDP optimizer and of the FSDP2 one on each rank, in turn
(the order alternates between rounds; a barrier before each timed call starts both ranks
together), and the figure is the median over rounds of the per-round ratio FSDP2 / DDP, as
``optimizer_cost.py`` measures its ratios. Under FSDP2 the step works on this rank's shards and
adds one all-reduce (the global norm); under DDP it works on the whole replica. These timings mean
something only on an otherwise idle machine (``--rounds 0`` skips them).

    python benchmarks/fsdp_memory.py [--width 64] [--rounds 15] [--warmup 3] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsam import SAM
from sparsam.models import create_model
from sparsam._sharded import local_numel_bytes

MODES = ("ddp", "fsdp2")


def _build(mode: str, width: int) -> tuple[torch.nn.Module, SAM]:
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
    return model, opt


def _timed_two_step(opt: SAM) -> float:
    dist.barrier()  # both ranks start together: FSDP2's all-reduce would otherwise time the other rank's lag
    t = time.perf_counter()
    opt.first_step()
    opt.second_step()
    return time.perf_counter() - t


def _worker(rank: int, world: int, port: int, width: int, rounds: int, warmup: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows: dict[str, dict[str, float]] = {}
        opts: dict[str, SAM] = {}
        for mode in MODES:
            model, opt = _build(mode, width)
            g = torch.Generator().manual_seed(rank)
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)

            def closure(model=model, x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)  # leaves the descent gradient in p.grad: the timed steps reuse it
            rows[mode] = {
                "backup": sum(b.numel() * b.element_size() for b in opt._backup.values()),
                "params": local_numel_bytes(model.parameters()),
                "momentum": local_numel_bytes(s["momentum_buffer"] for s in opt.state.values()),
            }
            opts[mode] = opt
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for r in range(warmup + rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            t = {mode: _timed_two_step(opts[mode]) for mode in order}
            if r >= warmup:
                for mode in MODES:
                    times[mode].append(t[mode])
        torch.save({"bytes": rows, "times": times}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def table(ranks: list[dict], width: int, rounds: int) -> str:
    """The Markdown table of the per-rank results (bytes, and times when rounds > 0)."""
    mib = 2**20
    timed = rounds > 0
    head = "| rank | DDP: copy of w (MiB) | FSDP2: copy of w (MiB) | FSDP2 / DDP | FSDP2: parameters held (MiB) | FSDP2: momentum (MiB) |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if timed:
        head += (
            " DDP: first_step + second_step (ms, median) | FSDP2 (ms, median) | time FSDP2 / DDP (median, min-max) |"
        )
        rule += "---:|---:|---:|"
    what = "bytes counted" + (
        f"; optimizer time: median of {rounds} interleaved rounds, 1 thread per rank" if timed else ""
    )
    lines = [
        f"SAM's extra state{' and optimizer time' if timed else ''} per rank, CIFAR ResNet-18 width {width}, "
        f"2 ranks (gloo, CPU), {what}\n",
        head,
        rule,
    ]
    for r, rank in enumerate(ranks):
        d, f = rank["bytes"]["ddp"], rank["bytes"]["fsdp2"]
        line = (
            f"| {r} | {d['backup'] / mib:.2f} | {f['backup'] / mib:.2f} | {f['backup'] / d['backup']:.3f} | "
            f"{f['params'] / mib:.2f} | {f['momentum'] / mib:.2f} |"
        )
        if timed:
            td, tf = rank["times"]["ddp"], rank["times"]["fsdp2"]
            ratios = [b / a for a, b in zip(td, tf)]
            line += (
                f" {1e3 * statistics.median(td):.2f} | {1e3 * statistics.median(tf):.2f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds of the optimizer step (0: bytes only)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    if args.width < 1:
        ap.error(f"--width must be at least 1, got {args.width}")
    if args.rounds < 0 or args.warmup < 0:
        ap.error(f"--rounds and --warmup must be >= 0, got {args.rounds} and {args.warmup}")
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(
            _worker, args=(world, port, args.width, args.rounds, args.warmup, tmp), nprocs=world
        )
        ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    text = table(ranks, args.width, args.rounds)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
