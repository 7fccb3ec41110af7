"""Robustness of run directories: nothing a run wrote is lost, and what cannot be done is refused in one
line with exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsam.__main__ import main

pytest.importorskip("sklearn")  # the digits data set

TINY = ["--train-subset", "256", "--test-subset", "90", "--batch-size", "64", "--threads", "1", "--no-progress"]
SRC = str(Path(__file__).resolve().parent.parent / "src")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "runA"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_a(finished, tmp_path):
    out = tmp_path / "runA"
    shutil.copytree(finished, out)
    return out


# -------------------------------------------------------------- --out cannot replace a finished run
def test_out_through_a_missing_folder_and_dotdot_cannot_replace_a_finished_run(run_a, tmp_path, capsys):
    before = snapshot(run_a)
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "ghost" / ".." / "runA")]) == 2
    line = one_error_line(capsys)
    assert "finished run" in line and str(run_a) in line
    assert snapshot(run_a) == before
    assert not (tmp_path / "ghost").exists()


# ---------------------------------------------------------------------- resume without a checkpoint
def test_resume_of_a_run_without_checkpoint_but_with_epochs_refuses(run_a, capsys):
    (run_a / "checkpoint.pt").unlink()
    (run_a / "summary.json").unlink()
    before = snapshot(run_a)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_a)]) == 2
    line = one_error_line(capsys)
    assert "checkpoint.pt" in line and "2 epochs" in line and "best_model.pt" in line
    assert snapshot(run_a) == before


def test_resume_of_a_run_stopped_in_its_first_epoch_still_starts_over(run_a, capsys):
    for name in ("checkpoint.pt", "summary.json", "metrics.jsonl", "best_model.pt"):
        (run_a / name).unlink()
    assert main(["train", "--resume", str(run_a)]) == 0
    assert len((run_a / "metrics.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------- one process per run directory (the lock)
def _hold_lock(path: Path, kind: str) -> subprocess.Popen:
    """A second process that holds the lock of ``path`` until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from sparsam.runs.rundir import lock_dir
        lock = lock_dir({str(path)!r}, kind={kind!r})
        print("locked", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_run_directory_is_refused(run_a, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = _hold_lock(out, "run")
    try:
        capsys.readouterr()
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert "in use" in line and f"pid {holder.pid}" in line
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0  # released on exit


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    from sparsam.runs.rundir import lock_dir

    holder = _hold_lock(tmp_path / "r", "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()
    lock_dir(tmp_path / "r", kind="run").release()  # free again: the OS dropped it with the process


def test_a_training_run_holds_its_lock_for_its_lifetime(tmp_path, capsys):
    from sparsam.train import build_config, train
    from sparsam.train.errors import RunDirError
    from sparsam.runs.rundir import lock_dir

    out = tmp_path / "r"
    seen = []

    def during_a_step(step):
        if not seen:
            with pytest.raises(RunDirError, match="in use"):
                lock_dir(out, kind="run")
            seen.append(step)

    cfg = build_config(
        [
            (
                "t",
                {
                    "data": "digits",
                    "train_subset": 128,
                    "test_subset": 90,
                    "batch_size": 64,
                    "epochs": 1,
                    "threads": 1,
                    "progress": False,
                    "out": str(out),
                },
            )
        ]
    )
    train(cfg, quiet=True, on_step=during_a_step)
    assert seen
    lock_dir(out, kind="run").release()  # and gives it back when it returns


def test_a_second_sweep_on_the_same_root_is_refused(tmp_path, capsys):
    root = tmp_path / "sweep"
    holder = _hold_lock(root, "sweep")
    try:
        capsys.readouterr()
        assert main(["sweep", "--root", str(root), "--methods", "sgd", *TINY, "--epochs", "1", "--no-report"]) == 2
        line = one_error_line(capsys)
        assert "in use" in line and "sweep" in line and f"pid {holder.pid}" in line
        assert not (root / "sgd-seed0").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# ---------------------------------------------------- resume from a file that is not the checkpoint
@pytest.mark.parametrize("name", ["best_model.pt", "other.pt"])
def test_resume_from_a_file_that_is_not_the_checkpoint_refuses(run_a, capsys, name):
    (run_a / "summary.json").unlink()
    if name == "other.pt":
        shutil.copy(run_a / "checkpoint.pt", run_a / "other.pt")
    before = snapshot(run_a)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_a / name), "--epochs", "3"]) == 2
    line = one_error_line(capsys)
    assert name in line and "checkpoint.pt" in line
    assert snapshot(run_a) == before


def test_resume_from_the_checkpoint_file_itself_works(run_a, capsys):
    (run_a / "summary.json").unlink()
    assert main(["train", "--resume", str(run_a / "checkpoint.pt"), "--epochs", "2"]) == 0


# ---------------------------------------------------------------- a sweep rerun with other settings
def test_a_sweep_rerun_with_other_settings_is_refused_unless_redo(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "--root", str(root), "--methods", "sgd", *TINY, "--no-report"]
    assert main([*argv, "--epochs", "1"]) == 0
    before = snapshot(root / "sgd-seed0")
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--lr", "0.07"]) == 2
    line = one_error_line(capsys)
    assert "sgd-seed0" in line and "--epochs: saved 1, now 2" in line and "--lr" in line and "--redo" in line
    assert snapshot(root / "sgd-seed0") == before
    assert main([*argv, "--epochs", "1"]) == 0  # the same settings: nothing to do, fine
    assert main([*argv, "--epochs", "2", "--lr", "0.07", "--redo"]) == 0
    cfg = json.loads((root / "sgd-seed0" / "config.json").read_text())["config"]
    assert (cfg["epochs"], cfg["lr"]) == (2, 0.07)
    assert len((root / "sgd-seed0" / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- --out that is a file
def test_out_that_is_a_file_or_under_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for out, says in ((f, "is a file"), (f / "run", f"{f} is a file")):
        capsys.readouterr()
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        assert says in one_error_line(capsys)
    capsys.readouterr()
    assert main(["demo", "--out", str(f), "--epochs", "1", "--methods", "sgd", "--no-plot"]) == 2
    assert "is a file" in one_error_line(capsys)
    capsys.readouterr()
    assert main(["sweep", "--root", str(f), "--methods", "sgd", *TINY, "--epochs", "1", "--no-report"]) == 2
    assert "is a file" in one_error_line(capsys)
    assert f.read_text() == "keep me"


# -------------------------------------------------------------------------- a malformed config.json
@pytest.mark.parametrize("content", ['{"config": [1, 2]}', "[1, 2]", '{"config": "x"}', "{"])
def test_a_malformed_config_json_is_a_clear_error(run_a, capsys, content):
    (run_a / "summary.json").unlink()
    (run_a / "config.json").write_text(content)
    before = snapshot(run_a)
    for argv in (["train", "--resume", str(run_a)], ["report", str(run_a), "--out", str(run_a.parent / "rep")]):
        capsys.readouterr()
        assert main(argv) == 2
        line = one_error_line(capsys)
        assert "config.json" in line
    assert snapshot(run_a) == before
