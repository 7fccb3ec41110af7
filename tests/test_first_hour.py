"""A new user's first hour: the davda54/sam drop-in, the CLI's one-line errors and short help,
and the start-up time of ``import sparsam``.

The drop-in tests follow the usage patterns of davda54/sam's README (constructor by position and
by keyword, the two-step loop, the closure form with its own first pass, a scheduler on
``optimizer.base_optimizer``) and compare against the plain reference step of ``tests/reference.py``.
"""

from __future__ import annotations

import subprocess
import sys


import pytest
import torch
import torch.nn.functional as F

from sparsam import SAM

from .reference import reference_sam_step, tiny_data, tiny_net


def _davda54_loop(model, optimizer, x, y, steps):
    """The loop of davda54/sam's README: pass 1, first_step, pass 2, second_step."""
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)  # "use this loss for any training statistics"
        loss.backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)


def _reference(model, x, y, steps, *, rho, adaptive=False, eta=0.01, **sgd):
    base = torch.optim.SGD(model.parameters(), **sgd)
    params = list(model.parameters())
    for _ in range(steps):
        reference_sam_step(
            params, base, lambda: F.cross_entropy(model(x), y).backward(), rho=rho, adaptive=adaptive, eta=eta
        )


# ---------------------------------------------------------------------------------------- the davda54 drop-in
@pytest.mark.parametrize(
    "make",
    [
        # README: base_optimizer = torch.optim.SGD; SAM(model.parameters(), base_optimizer, lr=0.1, momentum=0.9)
        lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
        lambda ps: SAM(ps, base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9),
        lambda ps: SAM(ps, torch.optim.SGD, 0.05, lr=0.1, momentum=0.9),  # rho by position
        lambda ps: SAM(ps, torch.optim.SGD, 0.05, False, lr=0.1, momentum=0.9),  # rho, adaptive by position
        lambda ps: SAM(ps, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1, momentum=0.9),
    ],
    ids=["positional-class", "keyword-base_optimizer", "positional-rho", "positional-rho-adaptive", "keywords"],
)
def test_davda54_constructor_forms_match_the_reference(make):
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    opt = make(m1.parameters())
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["adaptive"] is False
    _davda54_loop(m1, opt, x, y, steps=3)
    _reference(m2, x, y, 3, rho=0.05, lr=0.1, momentum=0.9)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_davda54_positional_adaptive_is_asam():
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    opt = SAM(m1.parameters(), torch.optim.SGD, 2.0, True, lr=0.1)  # README: ASAM with rho=2.0
    assert opt.param_groups[0]["adaptive"] is True
    _davda54_loop(m1, opt, x, y, steps=2)
    _reference(m2, x, y, 2, rho=2.0, adaptive=True, lr=0.1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_davda54_closure_pattern_with_its_own_first_pass_gives_the_two_step_result():
    """davda54's README runs pass 1 by hand, then ``step(closure)``, then ``zero_grad()``. Here
    the closure runs twice and pass 1's gradient is added to the hand-run one: 2g points the same
    way, so the step equals the two-step loop up to rounding."""
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(3):

        def closure():
            loss = F.cross_entropy(m1(x), y)
            loss.backward()
            return loss

        loss = F.cross_entropy(m1(x), y)
        loss.backward()
        o1.step(closure)
        o1.zero_grad()
    _davda54_loop(m2, o2, x, y, steps=3)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_davda54_scheduler_on_base_optimizer_and_param_groups():
    model = tiny_net()
    groups = [{"params": [model[0].weight, model[0].bias]}, {"params": model[2].parameters(), "lr": 0.01}]
    opt = SAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=4)  # README's tip
    x, y = tiny_data()
    _davda54_loop(model, opt, x, y, steps=1)
    sched.step()
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt.base_optimizer.param_groups]
    assert opt.param_groups[0]["lr"] < 0.1 and opt.param_groups[1]["lr"] < 0.01


def test_constructor_mistakes_get_one_clear_error():
    model = tiny_net()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), rho=0.05, lr=0.1)  # no class at all
    with pytest.raises(TypeError, match="twice"):
        SAM(model.parameters(), torch.optim.SGD, base_optimizer=torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"built SGD.*SAM\(optimizer, rho"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"rho=0\.05"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), 0.05)
    with pytest.raises(ValueError, match="-0.1"):
        SAM(model.parameters(), torch.optim.SGD, -0.1, lr=0.1)


def _davda54_state_dict(model):
    """What ``state_dict()`` of davda54's SAM holds after a step: its own per-parameter state with
    ``old_p`` (a copy of the weights) and its param groups with ``rho``/``adaptive``; the base
    optimizer's momentum lives in another object and is not saved."""
    params = list(model.parameters())
    return {
        "state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(params)},
        "param_groups": [
            {
                "rho": 0.05,
                "adaptive": False,
                "lr": 0.1,
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": 0,
                "nesterov": False,
                "params": list(range(len(params))),
            }
        ],
    }


def test_davda54_state_dict_is_refused_in_one_line_and_changes_nothing():
    x, y = tiny_data()
    model = tiny_net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _davda54_loop(model, opt, x, y, steps=1)
    before = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    with pytest.raises(ValueError, match="davda54/sam") as info:
        opt.load_state_dict(_davda54_state_dict(model))
    assert "\n" not in str(info.value) and "start the optimizer fresh" in str(info.value)
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], v) for k, v in before.items())
    assert all("old_p" not in s for s in opt.state.values())


# ---------------------------------------------------------------------------------------- start-up time
# Each costs 1-2 s (or more) to import and is needed only by the code that uses it.
HEAVY_MODULES = ("torch.distributed.tensor", "matplotlib", "transformers", "lightning", "accelerate")


def _imported_modules(code: str) -> set[str]:
    """The modules ``python -X importtime -c code`` imports, read from its import-time report."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in out.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


@pytest.mark.parametrize(
    "code",
    [
        "import sparsam; from sparsam import SAM, SSAM, masks, no_running_stats",  # names may load lazily
        "import sparsam.__main__, sparsam.cli.train, sparsam.cli.sweep",
    ],
    ids=["library", "cli-help-path"],
)
def test_start_up_imports_no_heavy_module(code):
    mods = _imported_modules(code)
    assert "sparsam" in mods and "torch" in mods  # the report was read
    heavy = sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))
    assert not heavy, f"{code!r} imports {heavy[:5]}: import them where they are used"


# ---------------------------------------------------------------------------------------- the command line
def _run_cli(argv, capsys):
    from sparsam.__main__ import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--epoch", "1"], "unknown option --epoch (did you mean --epochs?)"),
        (["train", "--learning-rate=0.1"], "unknown option --learning-rate=0.1"),
        (["train", "--opt", "sssam"], "invalid choice: 'sssam' (did you mean ssam?)"),
        (["train", "--mask", "fishr"], "invalid choice: 'fishr' (did you mean fisher?)"),
        (["sweep", "--root", "r", "--method", "sam"], "unknown option --method (did you mean --methods?)"),
        (["report", "runs", "--ot", "x"], "unknown option --ot (did you mean --out?)"),
        (["analyze", "runs/a", "--ot", "x"], "unknown option --ot (did you mean --out?)"),
        (["demo", "--seed", "3"], "unknown option --seed (did you mean --seeds?)"),
    ],
)
def test_a_typo_gets_one_line_with_a_suggestion(argv, expected, capsys):
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2 and out == ""
    assert expected in err
    assert err.count("\n") == 1 and "usage:" not in err  # one line, no usage block


@pytest.mark.parametrize("name", ["ssam-f", "ssam-d", "ssam-r", "ssam-n", "lookssam-f", "looksam", "esam", "sam"])
def test_opt_takes_method_names(name):
    from sparsam.cli.train import build_parser, resolve
    from sparsam.train.methods import METHODS

    cfg = resolve(build_parser("sparsam train").parse_args(["--opt", name]))
    assert cfg.method == name
    assert {k: getattr(cfg, k) for k in METHODS[name]} == METHODS[name]  # ssam-f: opt ssam, mask fisher


def test_opt_alias_in_a_config_file_and_over_a_preset(tmp_path):
    from sparsam.cli.train import build_parser, resolve
    from sparsam.train import ConfigError

    path = tmp_path / "c.json"
    path.write_text('{"opt": "ssam-d"}')
    cfg = resolve(build_parser("sparsam train").parse_args(["--config", str(path)]))
    assert (cfg.opt, cfg.mask) == ("ssam", "dynamic")
    # a later layer's alias replaces the preset's mask, as --opt ssam --mask fisher would
    args = ["--preset", "digits-smallcnn-ssam-d", "--opt", "ssam-f"]
    cfg = resolve(build_parser("sparsam train").parse_args(args))
    assert (cfg.opt, cfg.mask) == ("ssam", "fisher")
    with pytest.raises(ConfigError, match="--opt ssam-f means --opt ssam --mask fisher"):
        resolve(build_parser("sparsam train").parse_args(["--opt", "ssam-f", "--mask", "dynamic"]))
    path.write_text('{"opt": "sssam"}')
    with pytest.raises(ConfigError, match=r"did you mean ssam\?"):
        resolve(build_parser("sparsam train").parse_args(["--config", str(path)]))


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_short_help_and_help_all(command, capsys):
    from sparsam.train.config import FIELDS, flag

    module = __import__(f"sparsam.cli.{command}", fromlist=["SHORT_HELP"])
    rc, short, _ = _run_cli([command, "--help"], capsys)
    assert rc == 0
    listed = [name for _, names in module.SHORT_HELP for name in names]
    assert 10 <= len(listed) <= 16
    for name in listed:
        assert f"\n  {name}" in short, name
    assert short.count("\n") < 70 and "--help-all" in short
    assert "--fisher-bn-stats" not in short  # a specialist option: only in --help-all
    rc, full, _ = _run_cli([command, "--help-all"], capsys)
    assert rc == 0
    for name in FIELDS:  # every config option, including ones added after SHORT_HELP was written
        assert flag(name) in full, name


def test_preset_summaries_differ_within_a_family():
    from sparsam.train.presets import format_presets, list_presets

    text = format_presets()
    summaries: dict[tuple[str, str], str] = {}
    for p in list_presets().values():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(p.name + " "))
        summary = line.strip()[len(p.name) :].strip()
        assert (p.family, summary) not in summaries, f"{p.name} reads like {summaries[(p.family, summary)]}"
        summaries[(p.family, summary)] = p.name


# ---------------------------------------------------------------------------------------- README set-up
def test_readme_set_up_is_true_on_an_ordinary_machine():
    """The set-up section gives the CPU-index and the plain (GPU) torch lines, the test time and the
    quick subset; no command in README points at a path only the project's developers have."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in setup
    assert "\npip install torch   " in setup  # the plain line, for GPU machines
    assert 'python -m pytest -m "not slow"' in setup and "minutes" in setup
    commands = [ln for ln in readme.splitlines() if ln.lstrip().startswith(("sparsam ", "python ", "torchrun "))]
    for bad in ("../shared", "/tmp/", "/work/", "~/"):
        assert not any(bad in ln for ln in commands), bad


# ---------------------------------------------------------------------------------------- smaller points
class _NoForward(torch.nn.Module):
    """A module that computes its outputs in a training-step method, as some LightningModules do."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 3)

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_fisher_of_a_module_without_forward_says_so_without_a_fallback_warning():
    import warnings

    from sparsam.masks import fisher_information

    x, y = tiny_data(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the misleading "falling back to a per-sample loop" would fail here
        with pytest.raises(NotImplementedError, match=r"_NoForward .*needs a forward\(inputs\)"):
            fisher_information(_NoForward(), F.cross_entropy, [(x, y)], num_samples=4)


def test_fisher_still_falls_back_for_a_model_only_vmap_cannot_run():
    from sparsam.masks import fisher_information

    class ItemBranch(torch.nn.Module):  # data-dependent control flow: vmap refuses .item()
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) * (2.0 if x.sum().item() > 0 else 1.0)

    torch.manual_seed(0)
    model = ItemBranch()
    x, y = tiny_data(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="falling back to a per-sample loop"):
        fisher = fisher_information(model, F.cross_entropy, [(x, y)], num_samples=4)
    w = model.lin.weight
    expected = torch.zeros_like(w)
    for j in range(4):  # the definition: squared per-sample gradients, summed
        g = torch.autograd.grad(F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]), w)[0]
        expected += g**2
    torch.testing.assert_close(fisher["lin.weight"], expected)
