"""A variant written only here, against the contract of docs/design.md, runs unchanged through the
engine of ``sparsam train``, Lightning, Accelerate and the ``transformers`` ``SAMTrainer`` (the last
two with gradient accumulation): the frameworks ask it ``ascends_next()`` and ``selects_samples``
and read no attribute of a known class (it has no ``schedule``, ``steps`` or ``gamma``). Each run
equals the variant's own ``step(closure)`` loop, weights and counted compute."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sparsam import SAM

from .reference import tiny_data, tiny_net


class EveryThirdStepSAM(SAM):
    """SAM on steps 0, 3, 6, ...; one plain pass on the others."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = 0

    def ascends_next(self):
        return self.clock % 3 == 0

    def step(self, closure=None, **kwargs):
        one_step = super().step if self.ascends_next() else self._plain_step
        loss = one_step(closure, **kwargs)
        self.clock += 1
        return loss


KW = dict(rho=0.1, lr=0.1, momentum=0.9)
COMPUTE_4_STEPS = 2 + 1 + 1 + 2  # steps 0 and 3 perturb (two passes), 1 and 2 are plain (one)


def make(params, **kw):
    return EveryThirdStepSAM(params, torch.optim.SGD, **KW, **kw)


def test_the_variant_is_unknown_to_the_integrations():
    opt = make(tiny_net(dtype=torch.float32).parameters())
    assert not any(hasattr(opt, name) for name in ("schedule", "steps", "gamma", "one_pass"))
    assert opt.selects_samples is False and opt.ascends_next() is True


def _own_loop(net, batches):
    ref = copy.deepcopy(net)
    opt = make(ref.parameters(), model=ref)
    for x, y in batches:

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    return ref, opt


def _close(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_accelerate_with_accumulation(fresh_accelerate):
    from accelerate import Accelerator

    from sparsam.integrations.accelerate import SAMStep

    net = tiny_net(dtype=torch.float64)
    x, y = tiny_data(n=64)
    ref, ref_opt = _own_loop(net, list(zip(x.split(16), y.split(16))))  # a step = two micro-batches of 8
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = make(net.parameters(), model=net)
    model, popt, dl = acc.prepare(net, opt, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    step = SAMStep(acc, popt, model=model)
    seen = []

    def compute_loss(a, b):
        seen.append(opt.current_pass)
        return F.cross_entropy(model(a), b)

    for xb, yb in dl:
        with acc.accumulate(model):
            step(compute_loss, xb, yb)
    _close(net, ref)
    # the early micro-batch of a plain step runs as a plain pass (None), not as an ascent
    sam_step, plain = ["ascent", "ascent", "descent", "descent"], [None, None]
    assert seen == sam_step + plain + plain + sam_step
    assert opt.clock == 4 and opt.compute == ref_opt.compute == COMPUTE_4_STEPS


def test_lightning():
    L = pytest.importorskip("lightning.pytorch")
    from .test_variants_frameworks import _fit, loader, reference, same

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32, bn=True)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return make(self.net.parameters(), model=self.net)

    module = Net()
    ref, ref_opt = reference(module.net, make, list(loader())[:4])
    t = _fit(module, steps=4)
    same(module.net, ref)
    assert t.optimizers[0].compute == ref_opt.compute == COMPUTE_4_STEPS


def test_sam_trainer_with_accumulation(tmp_path):
    pytest.importorskip("transformers")
    from . import test_hf as hf

    steps = 4
    model, data = hf.tiny_bert(), hf.cls_data(steps * hf.BATCH * hf.ACCUM)
    ref = copy.deepcopy(model)
    decay = set(hf.transformers.Trainer.get_decay_parameter_names(None, ref))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    sam = EveryThirdStepSAM(torch.optim.SGD(groups, lr=0.05, momentum=0.9), rho=0.1, max_grad_norm=0.5)
    sam.model = ref
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda t: max(0.0, (steps - t) / steps))
    ref.train()
    for window in hf.batches(data, steps):

        def closure(window=window):
            for loss in hf.window_loss(ref, window):
                loss.backward()

        sam.zero_grad()
        sam.step(closure)
        sched.step()
    trainer = hf.SAMTrainer(
        model=model,
        args=hf.args(tmp_path, max_steps=steps),
        train_dataset=data,
        sam=lambda base: EveryThirdStepSAM(base, rho=0.1),
    )
    trainer.train()
    assert trainer.state.global_step == steps
    hf.assert_close(model, ref)
    assert trainer.sam_optimizer.compute == sam.compute == COMPUTE_4_STEPS


def test_engine_with_accumulation(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")  # the digits data set
    import dataclasses

    from sparsam.train import build_config, methods, train

    passes = []

    class Recording(EveryThirdStepSAM):
        def step(self, closure=None, **kwargs):
            passes.append([])

            def recording():
                passes[-1].append(self.current_pass)
                return closure()

            return super().step(recording, **kwargs)

    spec = methods.OPTIMIZERS["sam"]
    monkeypatch.setitem(
        methods.OPTIMIZERS, "sam", dataclasses.replace(spec, build=lambda ctx: Recording(ctx.base, **ctx.sam_kwargs()))
    )
    values = dict(data="digits", train_subset=256, test_subset=90, batch_size=64, epochs=1, threads=1)
    cfg = build_config([("test", {**values, "progress": False, "opt": "sam", "accum": 2, "out": str(tmp_path / "r")})])
    assert train(cfg, quiet=True).finished
    assert passes == [["ascent", "descent"], [None], [None], ["ascent", "descent"]]
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["compute"] == COMPUTE_4_STEPS and row["train_samples"] == 256 and not math.isnan(row["train_loss"])


@pytest.fixture
def fresh_accelerate():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
