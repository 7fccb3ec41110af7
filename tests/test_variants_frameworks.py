"""The cheaper SAMs under Lightning and Accelerate: a Trainer / SAMStep run equals the plain
``opt.step(closure)`` loop on a copy of the network, weight for weight. The reference closure is
written out here (the contract of docs/design.md: the sub-batch ascent's first ceil(f·n) samples,
ESAM's per-sample losses, its forward-only "measure" pass and its selected samples in pass 2)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sparsam.integrations import pass_batch, pass_loss
from sparsam.optim.esam import ESAM
from sparsam.masks import AllOnesMask, RandomMask
from sparsam.optim.looksam import LookSAM, LookSSAM
from sparsam.optim.schedule import ScheduledSAM, ScheduledSSAM

from .reference import tiny_data, tiny_net
from .launch import rank_env, spawn_ranks

KW = dict(rho=0.1, lr=0.1, momentum=0.9)
VARIANTS = {
    "every2-late": lambda p, **kw: ScheduledSAM(
        p, torch.optim.SGD, every=2, start=0.25, ramp=0.5, total_steps=8, **KW, **kw
    ),
    "looksam": lambda p, **kw: LookSAM(p, torch.optim.SGD, k=3, **KW, **kw),
    "esam-swp": lambda p, **kw: ESAM(p, torch.optim.SGD, beta=0.5, gamma=1.0, seed=7, **KW, **kw),
    "esam-sds": lambda p, **kw: ESAM(p, torch.optim.SGD, beta=0.5, gamma=0.5, seed=7, **KW, **kw),
    "asc-half": lambda p, **kw: ScheduledSAM(p, torch.optim.SGD, ascent_fraction=0.3, every=2, **KW, **kw),
    "looksam-asc": lambda p, **kw: LookSAM(p, torch.optim.SGD, k=2, ascent_fraction=0.5, **KW, **kw),
    "lookssam": lambda p, **kw: LookSSAM(p, torch.optim.SGD, k=3, mask=RandomMask(0.5, seed=1), **KW, **kw),
    "ssam-every2-asc": lambda p, **kw: ScheduledSSAM(
        p, torch.optim.SGD, every=2, ascent_fraction=0.5, mask=RandomMask(0.5, seed=1), **KW, **kw
    ),
}
STEPS = 8


def loader(batch=8, n=64):
    x, y = tiny_data(n=n, dtype=torch.float32)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def contract_closure(opt, model, x, y):
    """The closure of docs/variants.md, written out: what every framework path must reproduce."""

    def closure():
        if opt.current_pass == "measure":  # forward only, every sample, per-sample losses
            opt.record_sample_losses(F.cross_entropy(model(x), y, reduction="none"))
            return None
        idx = opt.batch_index
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        n = math.ceil(opt.batch_fraction * len(xb))
        losses = F.cross_entropy(model(xb[:n]), yb[:n], reduction="none")
        if opt.wants_sample_losses:
            opt.record_sample_losses(losses)
        loss = losses.mean()
        loss.backward()
        return loss

    return closure


def reference(net, make_opt, batches=None):
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters(), model=ref)
    for x, y in batches if batches is not None else loader():
        opt.zero_grad()
        opt.step(contract_closure(opt, ref, x, y))
    return ref, opt


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lightning_trainer_equals_the_closure_loop(name):
    L = pytest.importorskip("lightning.pytorch")

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32, bn=True)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = pass_batch(opt, batch)  # this pass's samples
            return pass_loss(opt, F.cross_entropy(self.net(x), y, reduction="none"))

        def configure_optimizers(self):
            return VARIANTS[name](self.net.parameters(), model=self.net)

    module = Net()
    ref, ref_opt = reference(module.net, VARIANTS[name])
    t = _fit(module)
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
            step(lambda a, b: F.cross_entropy(model(a), b, reduction="none"), x, y)  # per-sample losses
        same(net, ref)
        assert opt.compute == ref_opt.compute
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons: a fresh state for the test, and none left behind."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerate_two_micro_batches(name, net, x, y):
    """Train ``net`` with VARIANTS[name] through SAMStep, micro-batches of 8 accumulated in twos."""
    from accelerate import Accelerator

    from sparsam.integrations.accelerate import SAMStep

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = VARIANTS[name](net.parameters(), model=net)
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    model, popt, dl = acc.prepare(net, opt, dl)
    step = SAMStep(acc, popt, model=model)
    for xb, yb in dl:
        with acc.accumulate(model):
            step(lambda a, b: F.cross_entropy(model(a), b, reduction="none"), xb, yb)
    return opt


def test_accelerate_esam_selection_with_accumulation_is_esam_on_the_whole_batch(fresh_accelerate):
    """Two micro-batches of 8 = one batch of 16: pass 1's and the measure pass's per-sample losses
    cover both, the selection indexes the 16, pass 2 is the mean over the selected samples."""

    net = tiny_net(dtype=torch.float64)
    x, y = tiny_data(n=64)
    ref, ref_opt = reference(net, VARIANTS["esam-sds"], list(zip(x.split(16), y.split(16))))
    opt = _accelerate_two_micro_batches("esam-sds", net, x, y)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(ref_opt.compute) == 4 * (1 + 1 / 3 + 0.5)


def test_a_reduced_loss_is_refused_where_esam_selects(fresh_accelerate):
    from accelerate import Accelerator

    from sparsam.integrations.accelerate import SAMStep

    net = tiny_net(dtype=torch.float32)
    acc = Accelerator(cpu=True)
    opt = VARIANTS["esam-sds"](net.parameters(), model=net)
    model, popt = acc.prepare(net, opt)
    x, y = tiny_data(n=8, dtype=torch.float32)
    w = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"gamma=0.5.*reduction='none'"):
        SAMStep(acc, popt, model=model)(lambda a, b: F.cross_entropy(model(a), b), x, y)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w))  # nothing moved
    with pytest.raises(TypeError, match=r"1-D tensor.*shape \(8, 3\)"):
        SAMStep(acc, popt, model=model)(lambda a, b: model(a), x, y)


def _fit(module, steps=STEPS, *, own_loader=True, **trainer_kw):
    L = pytest.importorskip("lightning.pytorch")
    from sparsam.integrations.lightning import SAMCallback

    from .lightning_ranks import EndRank

    trainer_kw = {"devices": 1, **trainer_kw}
    t = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[SAMCallback()] + ([EndRank()] if "strategy" in trainer_kw else []),
        **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, *([loader()] if own_loader else []))
    return t


def test_lightning_manual_optimization_esam_selection_equals_the_closure_loop():
    """A manual closure on Lightning's wrapper reads the pass from it (the callback forwards the
    optimizer's properties to the wrapper, whose own copy would be stale) and uses the helpers."""
    L = pytest.importorskip("lightning.pytorch")

    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = tiny_net(dtype=torch.float32, bn=True)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()

            def closure():
                x, y = pass_batch(opt, batch)
                loss = pass_loss(opt, F.cross_entropy(self.net(x), y, reduction="none"))
                if opt.current_pass != "measure":  # forward only there
                    self.manual_backward(loss)
                return loss

            opt.zero_grad()
            opt.step(closure=closure)

        def configure_optimizers(self):
            return VARIANTS["esam-sds"](self.net.parameters(), model=self.net)

    module = Manual()
    ref, ref_opt = reference(module.net, VARIANTS["esam-sds"])
    t = _fit(module)
    same(module.net, ref)
    assert t.global_step == STEPS and t.optimizers[0].compute == ref_opt.compute


def test_lightning_training_step_without_sample_losses_is_refused_where_esam_selects():
    L = pytest.importorskip("lightning.pytorch")

    class Reduced(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # one number: ESAM cannot rank the samples

        def configure_optimizers(self):
            return VARIANTS["esam-sds"](self.net.parameters(), model=self.net)

    module = Reduced()
    w = copy.deepcopy(module.net.state_dict())
    with pytest.raises(RuntimeError, match=r"gamma=0.5.*record_sample_losses"):
        _fit(module)
    assert all(torch.equal(v, w[k]) for k, v in module.net.state_dict().items())  # nothing moved


@pytest.mark.parametrize("name", ["asc-half", "looksam-asc"])
def test_accelerate_schedule_and_sub_batch_ascent_with_accumulation(name, fresh_accelerate):
    """Two micro-batches of 8 per step: the ascent uses the first part of each micro-batch, and a
    step the schedule runs without ascent uses every sample of both (not the ascent's part)."""

    net = tiny_net(dtype=torch.float64)
    x, y = tiny_data(n=64)
    frac = 0.3 if name == "asc-half" else 0.5
    k = math.ceil(frac * 8)
    # the reference's batch of 16: both micro-batches' ascent parts first (the passes over all 16
    # samples are means, which do not depend on the order)
    order = [mb + i for part in (range(k), range(k, 8)) for mb in (0, 8) for i in part]
    ref_batches = [(xb[order], yb[order]) for xb, yb in zip(x.split(16), y.split(16))]
    ref_frac = VARIANTS[name]

    def make_ref(p, **kw):  # ceil(f' · 16) = 2k: the two micro-batches' ascent parts
        opt = ref_frac(p, **kw)
        opt.ascent_fraction = 2 * k / 16
        return opt

    ref, ref_opt = reference(net, make_ref, ref_batches)
    opt = _accelerate_two_micro_batches(name, net, x, y)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt.steps == 4


def esam_ddp_reference(net, steps=3, world=2, batch=4):
    """ESAM (rho = 0.5, gamma = 0.5, every weight) with SGD (lr = 0.5) on ``world`` DDP ranks,
    written out in one process: rank r reads samples r, r + world, ... (no shuffling), perturbs with
    its own gradient (ascent="local"), keeps the batch/2 samples whose loss rose most, and the
    descent gradients are averaged over the ranks. Returns ``net``'s parameters after the steps."""
    params = list(net.parameters())
    x, y = tiny_data(n=32, dtype=torch.float32)

    def grads(xb, yb):
        net.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        return [p.grad.clone() for p in params]

    for s in range(steps):
        descent = []
        for r in range(world):
            i = [r + world * (batch * s + j) for j in range(batch)]
            g = grads(x[i], y[i])
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                before = F.cross_entropy(net(x[i]), y[i], reduction="none")
                norm = torch.sqrt(sum((v**2).sum() for v in g))
                for p, v in zip(params, g):
                    p.add_(0.5 * v / (norm + 1e-12))
                after = F.cross_entropy(net(x[i]), y[i], reduction="none")
            keep = torch.tensor(i)[torch.topk(after - before, batch // 2).indices.sort().values]
            descent.append(grads(x[keep], y[keep]))
            with torch.no_grad():
                for p, v in zip(params, w):
                    p.copy_(v)
        with torch.no_grad():
            for p, gs in zip(params, zip(*descent)):
                p.sub_(0.5 * sum(gs) / world)
    return params


def _esam_ddp_worker(rank, world, port, out_dir):

    from accelerate import Accelerator

    from sparsam.integrations.accelerate import SAMStep

    rank_env(rank, world, port)
    acc = Accelerator(cpu=True)
    x, y = tiny_data(n=32, dtype=torch.float32)
    net = tiny_net(dtype=torch.float32)
    opt = ESAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.5, mask=AllOnesMask(), gamma=0.5, model=net)
    model, popt = acc.prepare(net, opt)
    step = SAMStep(acc, popt, model=model)
    for s in range(3):
        idx = [rank + world * (4 * s + j) for j in range(4)]
        step(lambda a, b: F.cross_entropy(model(a), b, reduction="none"), x[idx], y[idx])
    torch.save([p.detach() for p in model.parameters()], f"{out_dir}/esam-{rank}.pt")


@pytest.mark.slow
def test_accelerate_ddp_esam_selection_per_rank(tmp_path):
    """Two CPU processes: each rank perturbs with its own gradient (ascent="local"), selects the 2
    of its 4 samples whose loss rose most, and the descent gradients are averaged over the ranks."""
    pytest.importorskip("accelerate")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_esam_ddp_worker, 2, port, str(tmp_path))
    params = esam_ddp_reference(tiny_net(dtype=torch.float32))
    ranks = [torch.load(tmp_path / f"esam-{r}.pt") for r in range(2)]
    for p0, p1, q in zip(*ranks, params):
        assert torch.equal(p0, p1)  # the ranks agree bit for bit
        torch.testing.assert_close(p0, q.detach(), rtol=1e-5, atol=1e-6)


try:
    import lightning.pytorch as _L
except ImportError:  # the Lightning tests skip
    _L = None

if _L is not None:

    class _ESAMDDPModule(_L.LightningModule):
        """ESAM's data selection in automatic optimization; at module level so ddp_spawn can pickle it."""

        def __init__(self):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = pass_batch(opt, batch)
            return pass_loss(opt, F.cross_entropy(self.net(x), y, reduction="none"))

        def configure_optimizers(self):
            return ESAM(self.net.parameters(), torch.optim.SGD, rho=0.5, lr=0.5, mask=AllOnesMask(), gamma=0.5)

        def train_dataloader(self):
            # Lightning's own DistributedSampler shuffles; this one keeps the order the reference reads
            ds = TensorDataset(*tiny_data(n=32, dtype=torch.float32))
            return DataLoader(ds, batch_size=4, sampler=torch.utils.data.DistributedSampler(ds, shuffle=False))


@pytest.mark.slow
def test_lightning_ddp_esam_selection_per_rank():
    """Two CPU processes (ddp_spawn, gloo) in automatic optimization: pass 1 and the forward-only
    measure pass inside DDP's no_sync, each rank selects 2 of its 4 samples, pass 2's gradients are
    averaged over the ranks: the written-out reference of the Accelerate test above."""
    pytest.importorskip("lightning.pytorch")
    module = _ESAMDDPModule()
    expected = esam_ddp_reference(copy.deepcopy(module.net))
    # the module brings its own loader; ddp_spawn hands rank 0's weights back (not its step count)
    _fit(module, 3, own_loader=False, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    for p, q in zip(module.net.parameters(), expected):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def test_pass_batch_cuts_every_batch_tensor_of_a_nested_batch():
    from collections import namedtuple

    from sparsam.integrations import _take

    Pair = namedtuple("Pair", "y z")
    x, y, z, w = torch.arange(8.0), torch.arange(8) * 10, torch.ones(8, 2), torch.ones(3)
    batch = {"x": x, "pair": Pair(y, z), "list": [x, w], "weight": w, "scalar": torch.tensor(2.0), "name": "b"}
    opt = ScheduledSAM(tiny_net().parameters(), torch.optim.SGD, lr=0.1, ascent_fraction=0.3)
    assert pass_batch(opt, batch) is batch  # outside the ascent: the whole batch
    with opt.ascent_pass():
        cut = pass_batch(opt, batch)  # ceil(0.3 · 8) = 3 samples
    assert torch.equal(cut["x"], x[:3]) and torch.equal(cut["list"][0], x[:3])
    assert isinstance(cut["pair"], Pair) and torch.equal(cut["pair"].y, y[:3]) and cut["pair"].z.shape == (3, 2)
    assert cut["weight"] is w and cut["list"][1] is w and cut["scalar"].shape == () and cut["name"] == "b"
    picked = _take((x, y), torch.tensor([6, 1, 4]), 0.5)  # ESAM's index first, then the fraction
    assert torch.equal(picked[0], torch.tensor([6.0, 1.0])) and torch.equal(picked[1], torch.tensor([60, 10]))
    with pytest.raises(TypeError, match="no tensor"):
        _take({"name": "b"}, None, 0.5)
    # dict subclasses keep their type: a defaultdict (whose constructor takes its factory first)
    from collections import OrderedDict, defaultdict

    dd = defaultdict(list, {"x": x, "y": y})
    cut = _take(dd, None, 0.5)
    assert type(cut) is defaultdict and cut.default_factory is list and torch.equal(cut["y"], y[:4])
    assert type(_take(OrderedDict(x=x), None, 0.5)) is OrderedDict
    with pytest.raises(ValueError, match=r"1-D tensor\), got shape \(2, 2\)"):
        pass_loss(opt, torch.ones(2, 2))
