"""Launching ``sparsam`` under torchrun with two gloo processes on 127.0.0.1, and the environment of
one spawned rank, for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest


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
