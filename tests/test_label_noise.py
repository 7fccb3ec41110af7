"""--label-noise: exact count, only training labels, never the true class, deterministic per seed."""

from __future__ import annotations

import pytest
import torch

from sparsam.train import ConfigError, build_config
from sparsam.train.loaders import build_data, noisy_labels

pytest.importorskip("sklearn")  # the digits data set


def _labels(n: int, c: int) -> torch.Tensor:
    return torch.arange(n) % c


@pytest.mark.parametrize("n, c, fraction", [(1000, 10, 0.3), (257, 3, 0.2), (50, 2, 0.5), (10, 10, 0.0)])
def test_exact_count_never_the_true_class(n, c, fraction):
    old = _labels(n, c)
    before = old.clone()
    new, idx = noisy_labels(old, fraction, c, seed=4)
    assert torch.equal(old, before)  # input untouched
    changed = torch.nonzero(new != old).flatten()
    assert len(changed) == round(fraction * n)  # exactly this many, all of them different from the truth
    assert torch.equal(changed, idx)
    assert new.dtype == old.dtype and int(new.min()) >= 0 and int(new.max()) < c


def test_new_classes_cover_every_other_class():
    old = torch.zeros(3000, dtype=torch.int64)
    new, idx = noisy_labels(old, 0.5, 10, seed=0)
    counts = torch.bincount(new[idx], minlength=10)
    assert counts[0] == 0
    # 1500 draws over 9 classes: each expected 166.7, std ~12; a uniform draw is far inside 120..215.
    assert bool(((counts[1:] > 120) & (counts[1:] < 215)).all()), counts


def test_deterministic_per_seed():
    old = _labels(500, 10)
    a, ia = noisy_labels(old, 0.3, 10, seed=1)
    b, ib = noisy_labels(old, 0.3, 10, seed=1)
    _c, ic = noisy_labels(old, 0.3, 10, seed=2)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(ia, ic)


def test_rejects_bad_fraction():
    with pytest.raises(ConfigError, match="1.0"):
        noisy_labels(_labels(10, 2), 1.0, 2, seed=0)
    with pytest.raises(ConfigError, match="label-noise"):
        build_config([("test", {"data": "digits", "label_noise": -0.1})])


def _data(**over):
    cfg = build_config(
        [("test", {"data": "digits", "train_subset": 300, "test_subset": 90, "threads": 1, "progress": False, **over})]
    )
    return cfg, build_data(cfg, device=torch.device("cpu"), batch_per_rank=64)


def test_build_data_flips_training_labels_only():
    cfg0, clean = _data()
    cfg, noisy = _data(label_noise=0.3, subset_seed=3)
    _, clean3 = _data(subset_seed=3)
    assert cfg.label_noise == 0.3 and cfg0.label_noise == 0.0  # recorded in the run's config
    y_clean = clean3.train.dataset.labels
    y_noisy = noisy.train.dataset.labels
    assert torch.equal(clean3.train.dataset.images, noisy.train.dataset.images)
    assert int((y_clean != y_noisy).sum()) == round(0.3 * 300) == noisy.info["label_noise_flipped"]
    assert torch.equal(noisy.test.dataset.labels, clean3.test.dataset.labels)  # test set clean
    assert torch.equal(noisy.fisher.dataset.labels, y_noisy)  # Fisher samples are training samples
    _, again = _data(label_noise=0.3, subset_seed=3, seed=5)  # --seed does not change the noise
    assert torch.equal(again.train.dataset.labels, y_noisy)
    assert clean.info["label_noise_flipped"] == 0


def test_cli_refuses_a_bad_fraction_in_one_line(tmp_path, capsys):
    from sparsam.__main__ import main

    assert main(["train", "--label-noise", "1.5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--label-noise" in err and "1.5" in err
