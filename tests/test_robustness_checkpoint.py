"""Robustness of checkpoint files: a bit-flipped checkpoint is called damaged and never loaded with
wrong weights; a write on a full disk says so, keeps the old file and leaves no
temporary file, and stale temporary files are removed."""

from __future__ import annotations

import argparse
import errno
import struct
import zipfile

import pytest
import torch

from sparsam.runs.checkpoint import (
    load_checkpoint,
    read_torch_file,
    remove_stale_temp_files,
    save_checkpoint,
    save_torch_file,
)
from sparsam.train.errors import CheckpointError
from sparsam.runs.rundir import clear

PAYLOAD = {
    "epoch": 1,
    "model": {"w": torch.arange(1000, dtype=torch.float32)},
    "optimizer": {},
    "scheduler": {},
    "rng": {},
    "config": {"seed": 0},
}


def flip_bit(path, part, at=5):
    """Flip one bit inside the stored bytes of one part of a torch.save zip archive."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(part))
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26 : h + 30])
    data[h + 30 + name_len + extra_len + at] ^= 0x04
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- damaged checkpoint files
@pytest.mark.parametrize("part", ["data/0", "data.pkl"])
def test_a_bit_flipped_checkpoint_is_called_damaged(tmp_path, part):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, PAYLOAD)
    flip_bit(path, part)
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)  # a flip in the tensor data must not load silently, with a wrong weight
    msg = str(info.value)
    assert "damaged" in msg and "checksum" in msg and part in msg and "\n" not in msg
    assert "weights_only" not in msg
    assert path.read_bytes() == damaged  # left as it is


def test_a_file_holding_python_objects_is_refused_without_suggesting_unsafe_loading(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as info:
        read_torch_file(path)
    msg = str(info.value)
    assert "weights_only=False" not in msg and "will likely succeed" not in msg and "\n" not in msg
    assert "does not load it" in msg


def test_the_cli_says_a_damaged_checkpoint_is_damaged(tmp_path, capsys):
    from sparsam.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    path = run / "best_model.pt"
    torch.save({"model": {"w": torch.arange(100.0)}, "epoch": 1, "test_acc": 0.5}, path)
    flip_bit(path, "data/0", at=17)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "weights_only" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------ a full disk and stale temporary files
class _Full:
    """A file object on a disk that fills up after ``room`` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_gives_a_clear_error_keeps_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, PAYLOAD)
    before = path.read_bytes()
    import sparsam.runs.checkpoint as ck

    real = ck._WriteRecorder.__init__

    def on_full_disk(self, f):
        real(self, _Full(f, room=300))

    monkeypatch.setattr(ck._WriteRecorder, "__init__", on_full_disk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {**PAYLOAD, "epoch": 2})
    msg = str(info.value)
    assert "the disk is full" in msg and "previous checkpoint.pt is kept" in msg
    assert "enforce fail" not in msg and "unexpected pos" not in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no half-written .tmp
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no best_model.pt was written"):
        monkeypatch.setattr(ck._WriteRecorder, "__init__", on_full_disk)
        save_torch_file(tmp_path / "best_model.pt", {"w": torch.zeros(10_000)}, what="best model")


def test_stale_temporary_files_are_removed_also_by_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".checkpoint.pt.ab12cd.tmp", ".best_model.pt.x9.tmp", ".config.json.q.tmp"):
        (run / name).write_bytes(b"half written")
    (run / "notes.tmp").write_text("mine")  # not ours: left alone
    (run / ".other.file.tmp").write_text("not a run file")
    clear(run)  # what --overwrite does
    assert sorted(p.name for p in run.iterdir()) == [".other.file.tmp", "notes.tmp"]
    (run / ".checkpoint.pt.zz.tmp").write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temp_files(run)) == [".checkpoint.pt.zz.tmp", ".other.file.tmp"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.tmp"]
