"""The pass contract (docs/design.md): SAM.step is the one place the passes happen; a closure learns
its pass from ``opt.current_pass``; a variant that changes the sequence is a SAM subclass and runs
in the training engine with no edit there."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsam import SAM
from sparsam.train import build_config, methods, train


def _net_and_batch():
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randn(8, 4), torch.arange(8) % 3


def test_step_calls_the_closure_once_per_pass_and_names_the_pass():
    net, x, y = _net_and_batch()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=net)
    seen = []

    def closure():
        seen.append(opt.current_pass)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    assert opt.current_pass is None
    opt.step(closure)
    assert seen == ["ascent", "descent"] and opt.current_pass is None
    with opt.ascent_pass():
        assert opt.current_pass == "ascent" and opt.batch_fraction == 1.0
    assert opt.current_pass is None
    with pytest.raises(AttributeError):
        opt.current_pass = "descent"  # read-only


def test_plain_step_equals_a_plain_base_step():
    """_plain_step (what a schedule runs on its off-steps) is the base optimizer's step on the
    gradient at w: compared with plain SGD on the same model."""
    net, x, y = _net_and_batch()
    ref = nn.Linear(4, 3)
    ref.load_state_dict(net.state_dict())
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=net)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    passes = []

    def closure():
        passes.append(opt.current_pass)
        nn.functional.cross_entropy(net(x), y).backward()

    for _ in range(3):
        opt._plain_step(closure)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    assert passes == [None, None, None]
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_the_design_pages_variant_counts_compute_as_the_schedule_does():
    """docs/design.md's EveryOtherStepSAM (its code, run here) equals ScheduledSAM(every=2): the same
    passes and weights, and compute 6.0 after 2 SAM + 2 plain steps (its plain steps count)."""
    text = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class EveryOtherStepSAM" in b)
    namespace: dict = {}
    exec(compile(block, "docs/design.md", "exec"), namespace)
    variant, schedule = namespace["opts"]
    assert type(schedule).__name__ == "ScheduledSAM" and schedule.schedule.every == 2
    assert variant.compute == schedule.compute == 6.0


class EveryOtherStepSAM(SAM):
    """A variant that changes the pass sequence: SAM on even steps, one plain pass on odd ones."""

    calls: list[list[str | None]] = []

    def step(self, closure=None, *, grad_scaler=None, before_base_step=None, base_step=True):
        self._t = getattr(self, "_t", 0) + 1
        self.calls.append([])

        def recording():
            self.calls[-1].append(self.current_pass)
            return closure()

        if self._t % 2:
            return self._plain_step(recording, grad_scaler=grad_scaler, before_base_step=before_base_step)
        return super().step(recording, grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step)


def test_a_variant_runs_in_the_engine_without_edits_there(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")  # the digits data set
    spec = methods.OPTIMIZERS["sam"]

    def build(ctx):
        return EveryOtherStepSAM(ctx.base, **ctx.sam_kwargs())

    monkeypatch.setitem(methods.OPTIMIZERS, "sam", dataclasses.replace(spec, build=build))
    EveryOtherStepSAM.calls = []
    cfg = build_config(
        [
            (
                "test",
                {
                    "data": "digits",
                    "train_subset": 256,
                    "test_subset": 90,
                    "batch_size": 64,
                    "epochs": 1,
                    "threads": 1,
                    "progress": False,
                    "opt": "sam",
                    "accum": 2,
                    "out": str(tmp_path / "r"),
                },
            )
        ]
    )
    result = train(cfg, quiet=True)
    assert result.finished
    assert EveryOtherStepSAM.calls == [[None], ["ascent", "descent"], [None], ["ascent", "descent"]]
    # the train statistics count every sample once: from the one pass, or from the clean (ascent) pass
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_samples"] == 256 and rows[0]["step"] == 4


def test_one_implementation_of_the_contract_serves_the_engine_and_the_integrations():
    """The pass helpers live in sparsam.optim.passes (the engine's closure calls them) and
    sparsam.integrations exports those same functions; --opt sgd's PlainStep implements the contract
    as a plain pass (the whole batch, the mean of the per-sample losses, nothing recorded)."""
    import sparsam.integrations as integrations
    from sparsam.optim import passes
    from sparsam.train import engine
    from sparsam.optim.plain import PlainStep

    for name in ("pass_batch", "pass_loss", "unwrap_optimizer"):
        assert getattr(integrations, name) is getattr(passes, name)
    assert engine.pass_batch is passes.pass_batch and engine.pass_loss is passes.pass_loss
    net, x, y = _net_and_batch()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    plain = PlainStep(sgd)
    assert isinstance(plain, passes.PassContract)
    batch = (x, y)
    assert passes.pass_batch(plain, batch) is batch
    losses = nn.functional.cross_entropy(net(x), y, reduction="none")
    assert torch.equal(passes.pass_loss(plain, losses), losses.mean())
    reduced = losses.mean()
    assert passes.pass_loss(plain, reduced) is reduced
    with pytest.raises(TypeError, match="no sparsam SAM/SSAM optimizer found inside SGD"):
        passes.pass_batch(sgd, batch)
    with pytest.raises(TypeError, match="inside PlainStep"):
        passes.unwrap_optimizer(plain)  # the contract, but not a SAM: first_step / second_step are not there
