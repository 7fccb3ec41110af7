"""The registry of methods (sparsam.train.methods) is the one list every consumer reads."""

import pytest
import torch

from sparsam.train import ConfigError
from sparsam.train import methods as M
from sparsam.train.build import build_optimizer_and_base
from sparsam.train.config import TrainConfig, build_config


def test_method_names_round_trip_and_are_unique():
    shorts = [m.short for m in M.MASKS.values()]
    assert len(set(shorts)) == len(shorts)
    labels = [M.method_label(v) for v in M.METHODS.values()]
    assert len(set(labels)) == len(labels)
    for name, values in M.METHODS.items():
        cfg = TrainConfig(**values)
        assert cfg.method == name == M.method_name(values)
        assert M.method_values(name) == values
    assert list(M.METHODS)[:3] == ["sgd", "sam", "asam"]
    assert M.SPARSE_METHODS == (
        *("ssam-f", "ssam-d", "ssam-r", "lookssam-f", "lookssam-d", "lookssam-r"),
        *("smsam-f", "smsam-d", "smsam-r"),
    )
    with pytest.raises(ConfigError, match="unknown method 'adam'"):
        M.method_values("adam")


def _build(cfg: TrainConfig, model: torch.nn.Module):
    """(optimizer, base) for ``model`` as the engine builds them, with no Fisher data."""
    return build_optimizer_and_base(
        cfg,
        model.parameters(),
        model=model,
        loss_fn=torch.nn.functional.cross_entropy,
        fisher_data=[],
        steps_per_epoch=2,
        total_steps=4,
    )


def test_every_method_builds_its_optimizer_and_mask():
    import sparsam

    model = torch.nn.Linear(3, 2)
    for name, values in M.METHODS.items():
        cfg = build_config([("t", values)])
        opt, base = _build(cfg, model)
        spec = M.OPTIMIZERS[cfg.opt]
        assert (opt is base) == (spec.build is None), name
        if spec.uses_mask:
            assert isinstance(opt, sparsam.SSAM)
            assert type(opt.mask_source).__name__.lower().startswith(cfg.mask[:4]), (name, type(opt.mask))


def test_relevant_keys_follow_ownership():
    sgd, ssam_f, ssam_d = M.METHODS["sgd"], M.METHODS["ssam-f"], M.METHODS["ssam-d"]
    assert M.relevant("lr", sgd) and not M.relevant("rho", sgd) and not M.relevant("sparsity", sgd)
    assert M.relevant("num_samples", ssam_f) and not M.relevant("num_samples", ssam_d)
    assert M.relevant("dynamic_alpha", ssam_d) and M.relevant("rho", ssam_d)
    assert not M.relevant("sparsity", M.METHODS["ssam-n"]) and not M.is_sparse(M.METHODS["ssam-n"])


def test_registry_checks_run_in_validation():
    with pytest.raises(ConfigError, match="--mask dynamic supports only --pattern unstructured"):
        build_config([("t", {"opt": "ssam", "mask": "dynamic", "pattern": "structured"})])
    with pytest.raises(ConfigError, match="--adaptive applies to sam/asam/ssam/looksam/lookssam/esam, got --opt sgd"):
        build_config([("t", {"opt": "sgd", "adaptive": True})])
    with pytest.raises(ConfigError, match="--no-adaptive contradicts it"):
        build_config([("t", {"opt": "asam", "adaptive": False})])


def test_look_per_tensor_reaches_looksam_and_lookssam():
    model = torch.nn.Linear(3, 2)
    for opt_name, extra in (("looksam", {}), ("lookssam", {"mask": "random", "sparsity": 0.5})):
        built = []
        for flag in (False, True):
            cfg = build_config([("t", {"opt": opt_name, "look_per_tensor": flag, **extra})])
            opt, _ = _build(cfg, model)
            built.append(opt.per_tensor)
        assert built == [False, True], opt_name
    assert M.relevant("look_per_tensor", M.METHODS["looksam"]) and not M.relevant("look_per_tensor", M.METHODS["sam"])
