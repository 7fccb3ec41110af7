"""benchmarks/cifar_data.py: image folders from the official CIFAR-10 python archive's format, and
the manifest that tells one copy of the images from another."""

from __future__ import annotations

import importlib.util
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar_data.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_cifar_data", _PATH)
cd = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cd
_spec.loader.exec_module(cd)

pytest.importorskip("PIL")
NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _archive(path: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """A tiny archive in the official layout (cifar-10-batches-py/ with pickled dicts of bytes keys)."""
    rng = np.random.default_rng(0)
    images = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [*cd.TRAIN_BATCHES, "test_batch", "batches.meta"]:
            if name == "batches.meta":
                obj = {b"label_names": NAMES}
            else:
                data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
                images[name] = data
                obj = {b"data": data, b"labels": [i % 10 for i in range(per_batch)]}
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return images


def test_build_writes_lossless_class_folders_in_archive_order(tmp_path):
    from PIL import Image

    images = _archive(tmp_path / "c.tar.gz")
    counts = cd.build(tmp_path / "c.tar.gz", tmp_path / "out")
    assert counts == {"train": 20, "test": 4}
    # data_batch_1's image 1 has label 1 (automobile) and is that class's first image
    got = np.asarray(Image.open(tmp_path / "out/train/automobile/0000.png"))
    assert np.array_equal(got, images["data_batch_1"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    # data_batch_2's image 0 (label 0) is airplane's second
    got = np.asarray(Image.open(tmp_path / "out/train/airplane/0001.png"))
    assert np.array_equal(got, images["data_batch_2"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert sorted(p.name for p in (tmp_path / "out/test").iterdir()) == ["airplane", "automobile", "bird", "cat"]


def test_manifest_matches_its_folder_and_names_the_split_that_differs(tmp_path):
    _archive(tmp_path / "c.tar.gz")
    cd.build(tmp_path / "c.tar.gz", tmp_path / "out")
    cd.main(["manifest", str(tmp_path / "out"), "--out", str(tmp_path / "m.json")])
    assert cd.check(tmp_path / "out", tmp_path / "m.json") is None
    (tmp_path / "out/test/bird/0000.png").write_bytes(b"changed")
    problem = cd.check(tmp_path / "out", tmp_path / "m.json")
    assert problem is not None and "/test differs" in problem
    assert cd.main(["check", str(tmp_path / "out"), "--manifest", str(tmp_path / "m.json")]) == 1


def test_jpeg_build_changes_the_manifest(tmp_path):
    _archive(tmp_path / "c.tar.gz")
    cd.build(tmp_path / "c.tar.gz", tmp_path / "png")
    cd.build(tmp_path / "c.tar.gz", tmp_path / "jpg", fmt="jpeg")
    assert cd.manifest(tmp_path / "png")["sha256"] != cd.manifest(tmp_path / "jpg")["sha256"]


def test_not_the_archive_is_refused(tmp_path):
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(SystemExit, match="missing"):
        cd.build(tmp_path / "x.tar.gz", tmp_path / "out")


@pytest.mark.skipif(not Path("../shared/data/cifar10-jpeg").is_dir(), reason="the shared CIFAR-10 JPEG copy is absent")
def test_the_shared_copy_matches_the_committed_manifest():
    assert cd.check(Path("../shared/data/cifar10-jpeg"), cd.DEFAULT_MANIFEST) is None
