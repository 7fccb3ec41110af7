"""Launching ``sparsam`` under torchrun with two gloo processes on 127.0.0.1, spawning test workers
as ranks, and the environment of one spawned rank, for the tests.

Every multi-process test starts its processes here: ``spawn_ranks`` for a worker function,
``torchrun_sparsam`` for the command line (whose processes end through the engine's
``sparsam.train.distributed.teardown``). A rank that leaves a process group, or an object that still
holds one of its gloo work items, alive until the interpreter shuts down can abort at exit
("terminate called without an active exception", SIGABRT): gloo's threads then free tensors while
Python is being finalized. So each spawned rank destroys its process group and collects garbage
while the interpreter is alive, and a rank whose work succeeded leaves with ``os._exit(0)``.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest


def end_rank() -> None:
    """Destroy this process's process groups (if any) and collect the objects that held them, while
    the interpreter is fully alive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _rank_main(rank: int, worker: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        worker(rank, *args)
    finally:
        end_rank()
    # Success: skip interpreter finalization, where threads a library left behind (gloo's, a
    # framework's) can still abort the process after its work is done. Failures propagate above, so
    # torch.multiprocessing.spawn reports the worker's own traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker: Callable[..., Any], *args: Any, nprocs: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes (``worker`` at module level, so it
    pickles) and raise if any rank fails; each rank ends through ``end_rank``."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(worker, args), nprocs=nprocs, join=True)


def rank_env(rank: int, world: int, port: int) -> None:
    """Make this process rank ``rank`` of ``world`` on 127.0.0.1:``port`` the way torchrun would
    (the variables torch.distributed and Accelerate read), with one CPU thread (else Accelerate
    sets its own thread count)."""
    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_sparsam(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sparsam ARGS`` in 2 processes and fail the test unless it exits 0.

    The run gets its own session, so a hung run (unpaired collectives) is killed with its workers
    after ``timeout`` seconds instead of being left behind. ``env`` adds to the environment; each
    process uses one thread.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "-m", "sparsam", *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
