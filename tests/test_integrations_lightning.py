"""SAM / SSAM under the Lightning Trainer, compared weight for weight with the plain two-step loop.

Every Trainer run here trains a tiny MLP with BatchNorm for a few steps on the CPU in float32 and is
compared with :func:`reference_fit`, the hand-written loop from SAM's docstring on a copy of the
same network, fed the same batches in the same order. Lightning runs the same operations in the
same order, so the comparisons are exact (``torch.equal``), in mixed precision as well.
"""

from __future__ import annotations

import copy
import runpy
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision, MixedPrecision, Precision  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402

from sparsam import SAM, SSAM  # noqa: E402
from sparsam.integrations import unwrap_optimizer  # noqa: E402
from sparsam.integrations.lightning import SAMCallback, in_descent_pass  # noqa: E402
from sparsam.masks import FisherMask, MaskSource, RandomMask  # noqa: E402

from .lightning_ranks import EndRank  # noqa: E402
from .reference import tiny_data, tiny_net  # noqa: E402
from .test_integrations import ddp_reference  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),  # Lightning 2.6 with torch 2.13
    pytest.mark.filterwarnings("ignore:.*training_step.*returned.*None.*"),
]


# ------------------------------------------------------------------------------------------ fixtures
class Holder(nn.Module):
    """The reference network, named like the LightningModule's (``net.0.weight``...)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


class Net(L.LightningModule):
    def __init__(self, make_opt, *, manual=None, return_none_at=None):
        super().__init__()
        self.net = tiny_net(dtype=torch.float32, bn=True)
        self.loss_fn = F.cross_entropy
        self.make_opt = make_opt
        self.manual = manual
        if manual is not None:
            self.automatic_optimization = False
        self.seen_descent = []
        self.return_none_at = return_none_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.seen_descent.append(in_descent_pass(self))
        if self.manual is not None:
            return self.manual(self, batch)
        if batch_idx == self.return_none_at:
            return None
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_opt(self)


def loader(n=32, batch=8):
    x, y = tiny_data(n=n, dtype=torch.float32)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(steps=4, callbacks=(SAMCallback,), **kw):
    kw.setdefault("max_steps", steps)
    kw.setdefault("devices", 1)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[c() if isinstance(c, type) else c for c in callbacks] + ([EndRank()] if "strategy" in kw else []),
        **kw,
    )


def reference_fit(
    module, make_opt, steps, *, autocast=None, scaler=None, batch=8, micro=1, skip_batches=(), dtype=None
):
    """The two-step loop from SAM's docstring, on a copy of ``module.net`` taken before training."""
    ref = Holder(copy.deepcopy(module.net))
    if dtype is not None:
        ref = ref.to(dtype)
    opt = make_opt(ref)
    if opt.model is None:
        opt.model = ref  # BatchNorm statistics from pass 1 only, as the callback arranges
    ctx = (lambda: torch.autocast("cpu", dtype=autocast, cache_enabled=False)) if autocast else nullcontext
    losses = []
    done = 0
    for i, (x, y) in enumerate(loader(batch=batch)):
        if done == steps:
            break
        if i in skip_batches:
            continue
        if dtype is not None:
            x = x.to(dtype)

        def backward(x=x, y=y):
            total = 0.0
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with ctx():
                    loss = F.cross_entropy(ref(xm), ym) / micro
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total = total + loss.detach()
            return total

        with opt.ascent_pass():
            losses.append(backward())
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with opt.descent_pass():
            backward()
        opt.second_step(zero_grad=True)
        if scaler is not None:
            scaler.update()
        done += 1
    return ref, opt, losses


def same_state(module, ref):
    a, b = module.net.state_dict(), ref.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k].double() - b[k].double()).abs().max()}"


def sam_sgd(m, **kw):
    return SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw)


def ssam_adamw(m, **kw):
    mask = RandomMask(0.5, seed=3)
    return SSAM(m.parameters(), torch.optim.AdamW, rho=0.1, mask=mask, lr=0.01, **kw)


OPTS = {"sam_sgd": sam_sgd, "ssam_adamw": ssam_adamw}


# ------------------------------------------------------------------------------ automatic optimization
@pytest.mark.parametrize("name", list(OPTS))
def test_automatic_optimization_equals_two_step_loop(name):
    module = Net(OPTS[name])
    ref, ref_opt, losses = reference_fit(module, OPTS[name], steps=4)
    t = trainer(4)
    t.fit(module, loader())
    same_state(module, ref)  # weights, and BatchNorm statistics from the clean passes only
    assert t.global_step == 4
    # training_step ran twice per step; the second time inside in_descent_pass, unlogged
    assert module.seen_descent == [False, True] * 4
    assert torch.equal(t.callback_metrics["train_loss"], losses[-1])  # the loss at w, not at w + e
    opt = t.optimizers[0]
    assert opt.model is module
    assert unwrap_optimizer(module.optimizers()) is opt  # Lightning's wrapper
    if isinstance(opt, SSAM):
        assert opt.state_dict()["sparsam"]["steps"] == ref_opt.state_dict()["sparsam"]["steps"] == 4
        for k, m in opt.masks.items():
            assert torch.equal(m, ref_opt.masks[k])


def test_gradient_clipping_clips_the_descent_gradient_once():
    module = Net(sam_sgd)
    ref, _, _ = reference_fit(module, lambda m: sam_sgd(m, max_grad_norm=0.05), steps=4)
    calls = []

    class Count(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(torch.is_grad_enabled())

    t = trainer(4, callbacks=(SAMCallback, Count), gradient_clip_val=0.05)
    t.fit(module, loader())
    same_state(module, ref)
    assert len(calls) == 4  # once per step, not once per pass


def test_stock_lightning_clips_both_passes_harmlessly():
    # Without the callback Lightning's plain plugin calls SAM.step(closure) and clips after each
    # pass. A global-norm clip scales the ascent gradient by a constant, which e = rho g/||g||
    # removes (up to eps and rounding): the result matches the descent-only clip closely, not exactly.
    module = Net(lambda m: sam_sgd(m, model=m))
    ref, _, _ = reference_fit(module, lambda m: sam_sgd(m, max_grad_norm=0.05), steps=4)
    t = trainer(4, callbacks=(), gradient_clip_val=0.05)
    t.fit(module, loader())
    for p, q in zip(module.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_training_step_returning_none_skips_the_step():
    # Lightning still counts the batch as a step (global_step), as it does for any optimizer.
    module = Net(sam_sgd, return_none_at=1)
    ref, _, _ = reference_fit(module, sam_sgd, steps=2, skip_batches=(1,))
    t = trainer(3)
    t.fit(module, loader())
    same_state(module, ref)


# -------------------------------------------------------------------------------------- accumulation
def test_accumulate_grad_batches_is_refused():
    module = Net(sam_sgd)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer(4, accumulate_grad_batches=2).fit(module, loader())


def test_stock_accumulation_is_not_sam():
    # What the callback refuses, pinned: Lightning (without the callback) runs micro-batch 1 outside
    # the optimizer, then SAM.step(closure of micro-batch 2). Pass 1 sees both micro-batches, pass 2
    # only the second one, at half weight: the base step uses half of one micro-batch's gradient.
    module = Net(lambda m: sam_sgd(m, model=m))
    ref = Holder(copy.deepcopy(module.net))
    opt = sam_sgd(ref, model=ref)
    batches = list(loader())
    for x1, y1, x2, y2 in [(*batches[0], *batches[1]), (*batches[2], *batches[3])]:
        with opt.ascent_pass():
            (F.cross_entropy(ref(x1), y1) / 2).backward()
            (F.cross_entropy(ref(x2), y2) / 2).backward()
        opt.first_step(zero_grad=True)
        with opt.descent_pass():
            (F.cross_entropy(ref(x2), y2) / 2).backward()
        opt.second_step(zero_grad=True)
    t = trainer(2, callbacks=(), accumulate_grad_batches=2)
    t.fit(module, loader())
    same_state(module, ref)


# ----------------------------------------------------------------------------------- mixed precision
def test_bf16_mixed_equals_autocast_loop():
    module = Net(ssam_adamw)
    ref, _, _ = reference_fit(module, ssam_adamw, steps=4, autocast=torch.bfloat16)
    t = trainer(4, precision="bf16-mixed")
    t.fit(module, loader())
    same_state(module, ref)


@pytest.mark.parametrize(
    "precision,dtype,make_opt",
    [
        ("64-true", torch.float64, ssam_adamw),
        ("bf16-true", torch.bfloat16, ssam_adamw),
        ("16-true", torch.float16, sam_sgd),
    ],
)
def test_true_precision_equals_loop_in_that_dtype(precision, dtype, make_opt):
    # Lightning converts the module (and the batches) to the dtype; SAM's restore is a copy in any
    # dtype. (AdamW's eps = 1e-8 is 0 in float16, hence SGD there.)
    module = Net(make_opt)
    ref, _, _ = reference_fit(module, make_opt, steps=4, dtype=dtype)
    t = trainer(4, precision=precision)
    t.fit(module, loader())
    assert module.net[0].weight.dtype == dtype
    assert torch.isfinite(module.net[0].weight).all()
    same_state(module, ref)


@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**40], ids=["finite", "overflow"])
def test_16_mixed_with_grad_scaler_equals_scaler_loop(init_scale):
    # The Trainer turns precision="16-mixed" on a CPU into bf16 (with a warning); the plugin itself
    # runs fp16 autocast and a real GradScaler on the CPU, which is what is tested here. With
    # init_scale=2**40 the scaled fp16 gradients overflow: the first steps are skipped and the
    # scale is lowered, exactly as in the reference loop.
    module = Net(sam_sgd)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    ref, _, _ = reference_fit(module, sam_sgd, steps=4, autocast=torch.float16, scaler=ref_scaler)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    t = trainer(4, plugins=[plugin])
    t.fit(module, loader())
    same_state(module, ref)
    assert plugin.scaler.get_scale() == ref_scaler.get_scale()
    if init_scale > 2.0**20:
        assert ref_scaler.get_scale() < init_scale  # overflow happened, steps were skipped


def test_16_mixed_without_callback_fails_loudly():
    module = Net(sam_sgd)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="needs a closure"):
        trainer(1, callbacks=(), plugins=[plugin]).fit(module, loader())


def test_unsupported_precision_plugin_is_refused():
    class OwnStep(Precision):
        def optimizer_step(self, optimizer, model, closure, **kwargs):
            return optimizer.step(closure=closure)

    with pytest.raises(ValueError, match="OwnStep"):
        trainer(1, plugins=[OwnStep()]).fit(Net(sam_sgd), loader())


@pytest.mark.parametrize(
    "plugin, reason",
    [(DeepSpeedPrecision, r"closure once and then deepspeed_engine\.step\(\)"), (FSDPPrecision, "FSDP1.*fully_shard")],
)
def test_plugins_that_own_the_step_are_refused_with_the_reason(plugin, reason):
    module = Net(sam_sgd)
    before = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match=reason):
        trainer(1, plugins=[plugin("32-true")]).fit(module, loader())
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in before.items())  # nothing stepped


def test_xla_plugin_is_refused_as_untested():
    # XLAPrecision cannot be built without torch_xla: an instance without __init__ has its class.
    from lightning.pytorch.plugins.precision import XLAPrecision

    module = Net(sam_sgd)
    strategy = SimpleNamespace(precision_plugin=XLAPrecision.__new__(XLAPrecision))
    stub = SimpleNamespace(optimizers=[sam_sgd(module)], strategy=strategy, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="XLAPrecision: the XLA plugin's optimizer step.*has not been tested"):
        SAMCallback().on_fit_start(stub, module)


def test_fsdp1_strategy_is_refused_with_the_reason():
    # Lightning builds an FSDPStrategy Trainer on CUDA only (its accelerator connector refuses
    # accelerator="cpu"), so the callback's hook gets the two Trainer attributes it reads.
    module = Net(sam_sgd)
    stub = SimpleNamespace(optimizers=[sam_sgd(module)], strategy=FSDPStrategy(), accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="FSDPStrategy.*FSDP1.*plain tensors.*ModelParallelStrategy.*fully_shard"):
        SAMCallback().on_fit_start(stub, module)


# ------------------------------------------------------------------------------- manual optimization
def manual_closure_step(module, batch, micro=2):
    # Gradient accumulation the SAM way: every micro-batch in both passes, inside the closure.
    opt = module.optimizers()
    x, y = batch

    def closure():
        total = 0.0
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            loss = module.loss_fn(module(xm), ym) / micro
            module.manual_backward(loss)
            total = total + loss.detach()
        return total

    opt.zero_grad()
    return opt.step(closure=closure)


def manual_two_step(module, batch):
    opt = module.optimizers()  # Lightning's wrapper: the callback points SAM's methods to the real one
    x, y = batch
    with opt.ascent_pass():
        module.manual_backward(module.loss_fn(module(x), y))
    opt.first_step(zero_grad=True)
    with opt.descent_pass():
        module.manual_backward(module.loss_fn(module(x), y))
    opt.second_step(zero_grad=True)


def test_manual_optimization_closure_with_micro_batches():
    module = Net(sam_sgd, manual=manual_closure_step)
    ref, _, _ = reference_fit(module, sam_sgd, steps=4, micro=2)
    t = trainer(4)
    t.fit(module, loader())
    same_state(module, ref)
    assert t.global_step == 4


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_manual_optimization_two_step_api(precision):
    module = Net(ssam_adamw, manual=manual_two_step)
    plugins, ref_scaler = [], None
    if precision == "16-mixed":  # training_step runs under the plugin's fp16 autocast
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref, ref_opt, _ = reference_fit(
        module, ssam_adamw, steps=4, autocast=torch.float16 if plugins else None, scaler=ref_scaler
    )
    t = trainer(4, plugins=plugins)
    t.fit(module, loader())
    same_state(module, ref)
    assert t.global_step == 4  # second_step counted as the optimizer step: max_steps stops the run
    real = t.optimizers[0]
    assert real.state_dict()["sparsam"]["steps"] == 4  # the real optimizer, not the wrapper, stepped
    assert "_steps" not in vars(module.optimizers())
    if plugins:
        assert plugins[0].scaler.get_scale() == ref_scaler.get_scale()


def raw_two_step(module, batch):
    opt = module.optimizers(use_pl_optimizer=False)  # the real optimizer: no step counting
    x, y = batch
    with opt.ascent_pass():
        module.manual_backward(module.loss_fn(module(x), y))
    opt.first_step(zero_grad=True)
    with opt.descent_pass():
        module.manual_backward(module.loss_fn(module(x), y))
    opt.second_step(zero_grad=True)


def test_manual_two_step_on_raw_optimizer_is_not_counted_without_callback():
    # What docs/frameworks.md warns about: Lightning counts manual steps in its optimizer wrapper's
    # step(); first_step/second_step on the raw optimizer train correctly but global_step stays 0
    # (so max_steps would never stop the run).
    module = Net(lambda m: sam_sgd(m, model=m), manual=raw_two_step)
    ref, _, _ = reference_fit(module, sam_sgd, steps=4)
    t = trainer(callbacks=(), max_steps=-1, max_epochs=1)
    t.fit(module, loader())
    same_state(module, ref)
    assert t.global_step == 0


# ---------------------------------------------------------------------------------- data-driven masks
class RecordingMask(MaskSource):
    needs_data = True

    def __init__(self):
        super().__init__(0.5)
        self.ctx = None

    def init(self, ctx):
        self.ctx = ctx
        self.batches = [b for b in ctx.data]
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.params.items()}


def test_data_driven_mask_gets_train_loader_and_loss():
    mask = RecordingMask()
    module = Net(lambda m: SSAM(m.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1))
    trainer(1).fit(module, loader())
    assert mask.ctx.model is module and mask.ctx.loss_fn is F.cross_entropy
    expected = list(loader())
    assert len(mask.batches) == len(expected)
    for (x, y), (ex, ey) in zip(mask.batches, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_data_driven_mask_without_loss_is_refused():
    module = Net(lambda m: SSAM(m.parameters(), torch.optim.SGD, rho=0.1, mask=RecordingMask(), lr=0.1))
    module.loss_fn = None
    with pytest.raises(ValueError, match="needs a loss function"):
        trainer(1).fit(module, loader())


def test_fisher_mask_equals_two_step_loop():
    def make(m):
        mask = FisherMask(0.5, num_samples=16, update_every=2)
        return SSAM(m.parameters(), torch.optim.SGD, rho=0.1, mask=mask, lr=0.1)

    module = Net(make)

    def make_ref(ref):
        opt = make(ref)
        opt.loss_fn, opt.data = F.cross_entropy, loader()
        return opt

    ref, ref_opt, _ = reference_fit(module, make_ref, steps=4)
    t = trainer(4)
    t.fit(module, loader())
    same_state(module, ref)
    for k, m in t.optimizers[0].masks.items():
        assert torch.equal(m, ref_opt.masks[k])


# ------------------------------------------------------------------------------------------- resume
def test_resume_from_checkpoint_is_exact(tmp_path):
    # Straight: 2 epochs of 4 steps. Resumed: 1 epoch, checkpoint, a new Trainer for epoch 2.
    straight = Net(ssam_adamw)
    trainer(max_steps=-1, max_epochs=2).fit(straight, loader())

    first = Net(ssam_adamw)
    t1 = trainer(max_steps=-1, max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = Net(ssam_adamw)
    t2 = trainer(max_steps=-1, max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=str(ckpt))
    same_state(resumed, Holder(straight.net))
    assert t2.optimizers[0].state_dict()["sparsam"]["steps"] == 8


# ---------------------------------------------------------------------------------------------- DDP
class PlainNet(L.LightningModule):
    def __init__(self, ascent):
        super().__init__()
        self.net = tiny_net(dtype=torch.float32, bn=False)
        self.ascent = ascent

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.5, lr=0.5, ascent=self.ascent)

    def train_dataloader(self):
        # Lightning's own DistributedSampler shuffles; this one keeps the order the reference reads.
        x, y = tiny_data(n=32, dtype=torch.float32)
        ds = TensorDataset(x, y)
        return DataLoader(ds, batch_size=4, sampler=torch.utils.data.DistributedSampler(ds, shuffle=False))


@pytest.mark.slow
@pytest.mark.parametrize("ascent", ["local", "sync"])
def test_ddp_ascent_modes(ascent):
    # Two CPU processes (gloo). With ascent="local" the callback runs pass 1 inside DDP's no_sync
    # (Lightning's block_backward_sync): each rank perturbs with its own gradient.
    module = PlainNet(ascent)
    expected = {a: ddp_reference(module.net, a, steps=3) for a in ("local", "sync")}
    t = trainer(3, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
    t.fit(module)
    other = "sync" if ascent == "local" else "local"
    for p, q, o in zip(module.net.parameters(), expected[ascent].parameters(), expected[other].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(
        not torch.allclose(p, o, rtol=1e-4, atol=1e-5)
        for p, o in zip(module.net.parameters(), expected[other].parameters())
    )


# ------------------------------------------------------------------------------------------ example
def test_example_script(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parent.parent / "examples" / "lightning_train.py"
    main = runpy.run_path(str(script), run_name="example")["main"]
    main(
        [
            "--method",
            "ssam-random",
            "--epochs",
            "2",
            "--limit-train-batches",
            "2",
            "--accelerator",
            "cpu",
            "--clip",
            "1.0",
        ]
    )
    assert capsys.readouterr().out.splitlines()[-1].endswith("after 4 steps")


# ------------------------------------------------------------------------------ a variant, unedited
def test_a_sequence_changing_variant_runs_without_edits_here():
    """A SAM subclass that runs one pass on odd steps (docs/design.md) works under the callback as in
    a plain ``opt.step(closure)`` loop: same passes, same weights."""
    from .test_train_passes import EveryOtherStepSAM

    def make(m):
        return EveryOtherStepSAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=m)

    module = Net(make)
    ref = Holder(copy.deepcopy(module.net))
    ref_opt = make(ref)
    EveryOtherStepSAM.calls = []
    t = trainer(4)
    t.fit(module, loader())
    under_lightning, EveryOtherStepSAM.calls = EveryOtherStepSAM.calls, []
    for i, (x, y) in enumerate(loader()):
        if i == 4:
            break

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        ref_opt.step(closure)
        ref_opt.zero_grad()
    assert under_lightning == EveryOtherStepSAM.calls == [[None], ["ascent", "descent"]] * 2
    same_state(module, ref)
    assert t.global_step == 4


# ------------------------------------------------------------------------------ Momentum-SAM
def test_msam_runs_one_pass_per_step():
    # MSAM under the callback: training_step runs once per step (never in a descent pass), the
    # result is MSAM's own opt.step(closure) loop bit for bit (BatchNorm statistics from its one
    # pass, as in the paper), and the logged loss is that pass's.
    from sparsam import MSAM

    def make(m, **kw):
        return MSAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw)

    module = Net(make)
    ref = Holder(copy.deepcopy(module.net))
    ref_opt = make(ref, model=ref)
    losses = []
    for x, y in list(loader())[:4]:

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        ref_opt.zero_grad()
        losses.append(ref_opt.step(closure).detach())
    t = trainer(4)
    t.fit(module, loader())
    same_state(module, ref)
    assert t.global_step == 4
    assert module.seen_descent == [False] * 4  # one pass per step
    assert t.optimizers[0].compute == ref_opt.compute == 4.0
    assert torch.equal(t.callback_metrics["train_loss"], losses[-1])
