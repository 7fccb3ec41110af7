"""The cheaper SAMs under Lightning and Accelerate, unchanged integrations: a Trainer / SAMStep run
equals the plain ``opt.step(closure)`` loop on a copy of the network, weight for weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sparsam.optim.esam import ESAM
from sparsam.optim.looksam import LookSAM
from sparsam.optim.schedule import ScheduledSAM

from .reference import tiny_data, tiny_net

KW = dict(rho=0.1, lr=0.1, momentum=0.9)
VARIANTS = {
    "every2-late": lambda p, **kw: ScheduledSAM(
        p, torch.optim.SGD, every=2, start=0.25, ramp=0.5, total_steps=8, **KW, **kw
    ),
    "looksam": lambda p, **kw: LookSAM(p, torch.optim.SGD, k=3, **KW, **kw),
    "esam-swp": lambda p, **kw: ESAM(p, torch.optim.SGD, beta=0.5, gamma=1.0, seed=7, **KW, **kw),
}
STEPS = 8


def loader(batch=8, n=64):
    x, y = tiny_data(n=n, dtype=torch.float32)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def reference(net, make_opt):
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters(), model=ref)
    for x, y in loader():

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    return ref, opt


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lightning_trainer_equals_the_closure_loop(name):
    L = pytest.importorskip("lightning.pytorch")
    from sparsam.integrations.lightning import SAMCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32, bn=True)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return VARIANTS[name](self.net.parameters(), model=self.net)

    module = Net()
    ref, ref_opt = reference(module.net, VARIANTS[name])
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[SAMCallback()],
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, loader())
    same(module.net, ref)
    assert t.global_step == STEPS
    assert t.optimizers[0].compute == ref_opt.compute


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_accelerate_samstep_equals_the_closure_loop(name):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from sparsam.integrations.accelerate import SAMStep

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        net = tiny_net(dtype=torch.float32, bn=True)
        ref, ref_opt = reference(net, VARIANTS[name])
        acc = Accelerator(cpu=True)
        opt = VARIANTS[name](net.parameters(), model=net)
        model, popt, dl = acc.prepare(net, opt, loader())
        step = SAMStep(acc, popt, model=model)
        for x, y in dl:
            step(lambda a, b: F.cross_entropy(model(a), b), x, y)
        same(net, ref)
        assert opt.compute == ref_opt.compute
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
