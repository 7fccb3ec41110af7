"""SAM / SSAM in Accelerate loops (single process, CPU), compared weight for weight with the plain
two-step loop on a copy of the same network fed the same batches."""

from __future__ import annotations

import copy
import os
import runpy
import socket
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from sparsam import SAM, SSAM  # noqa: E402
from sparsam.integrations import unwrap_optimizer  # noqa: E402
from sparsam.integrations.accelerate import SAMStep  # noqa: E402
from sparsam.masks import RandomMask  # noqa: E402

from .reference import tiny_data, tiny_net  # noqa: E402
from .launch import rank_env, spawn_ranks  # noqa: E402
from .test_integrations import ddp_reference  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; each test builds its own Accelerator.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader(batch=8, n=32):
    x, y = tiny_data(n=n, dtype=torch.float32)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def sam_sgd(params, **kw):
    return SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kw)


def ssam_adamw(params, **kw):
    return SSAM(params, torch.optim.AdamW, rho=0.1, mask=RandomMask(0.5, seed=3), lr=0.01, **kw)


def reference(net, make_opt, *, micro=1, dtype=None, scaler=None, max_grad_norm=None):
    """The two-step loop from SAM's docstring; the forward runs under ``dtype`` autocast and its
    output is cast back to float32, as Accelerate's prepared model does."""
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters(), model=ref, max_grad_norm=max_grad_norm)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
    for x, y in loader():

        def backward(x=x, y=y):
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with ctx():
                    out = ref(xm)
                loss = F.cross_entropy(out.float(), ym) / micro
                (scaler.scale(loss) if scaler is not None else loss).backward()

        with opt.ascent_pass():
            backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with opt.descent_pass():
            backward()
        opt.second_step(zero_grad=True)
        if scaler is not None:
            scaler.update()
    return ref, opt


def assert_same(a, b):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{k}: max |diff| {(p.double() - q.double()).abs().max()}"


@pytest.mark.parametrize("make_opt", [sam_sgd, ssam_adamw], ids=["sam_sgd", "ssam_adamw"])
def test_sam_step_after_prepare_equals_two_step_loop(make_opt, tmp_path):
    net = tiny_net(dtype=torch.float32, bn=True)
    ref, ref_opt = reference(net, make_opt)
    acc = accelerate.Accelerator(cpu=True)
    model, opt, dl = acc.prepare(net, make_opt(net.parameters()), loader())
    assert type(opt).__name__ == "AcceleratedOptimizer" and not hasattr(opt, "first_step")
    sam = unwrap_optimizer(opt)
    assert isinstance(sam, SAM)
    step = SAMStep(acc, opt, model=model)
    for x, y in dl:
        step(lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert_same(model, ref)  # weights and BatchNorm statistics (pass 1 only)
    if isinstance(sam, SSAM):
        assert sam.state_dict()["sparsam"]["steps"] == 4
        for k, m in sam.masks.items():
            assert torch.equal(m, ref_opt.masks[k])
        acc.save_state(str(tmp_path / "state"))  # Accelerate's checkpoint holds SAM's state dict
        saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=False)
        assert (
            saved["sparsam"]["steps"] == 4
            and saved["sparsam"]["masks"].keys() == sam.state_dict()["sparsam"]["masks"].keys()
        )


def test_prepared_step_with_closure_is_correct_in_float32():
    net = tiny_net(dtype=torch.float32, bn=True)
    ref, _ = reference(net, sam_sgd)
    acc = accelerate.Accelerator(cpu=True)
    model, opt, dl = acc.prepare(net, sam_sgd(net.parameters(), model=net), loader())
    for x, y in dl:

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            return loss

        opt.zero_grad()
        opt.step(closure)
    assert_same(model, ref)


def test_prepared_step_with_closure_fails_under_fp16():
    # Why SAMStep exists: Accelerate's fp16 path is GradScaler.step(optimizer, closure).
    net = tiny_net(dtype=torch.float32)
    acc = fp16_accelerator(2.0**10)
    model, opt = acc.prepare(net, sam_sgd(net.parameters()))
    x, y = tiny_data(n=8, dtype=torch.float32)

    def closure():
        loss = F.cross_entropy(model(x), y)
        acc.backward(loss)
        return loss

    with pytest.raises(AssertionError, match="scale"):
        opt.step(closure)


def test_accumulate_runs_every_micro_batch_in_both_passes():
    # Accumulating 2 micro-batches of 4 = SAM on the batch of 8 with the mean of the micro-batch losses.
    net = tiny_net(dtype=torch.float32, bn=False)
    ref, _ = reference(net, ssam_adamw, micro=2)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt, dl = acc.prepare(net, ssam_adamw(net.parameters()), loader(batch=4))
    step = SAMStep(acc, opt, model=model)
    for x, y in dl:
        with acc.accumulate(model):
            step(lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert_same(model, ref)
    assert unwrap_optimizer(opt).state_dict()["sparsam"]["steps"] == 4


def test_bf16_mixed_precision():
    net = tiny_net(dtype=torch.float32, bn=True)
    ref, _ = reference(net, sam_sgd, dtype=torch.bfloat16)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model, opt, dl = acc.prepare(net, sam_sgd(net.parameters()), loader())
    step = SAMStep(acc, opt, model=model)
    for x, y in dl:
        step(lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert_same(model, ref)


def fp16_accelerator(init_scale, **kw):
    # Accelerate makes a GradScaler only on accelerators (fp16 on a CPU is plain float32). The
    # scaler path, which is what fp16 on a GPU runs, is tested with a CPU GradScaler put in its place.
    acc = accelerate.Accelerator(cpu=True, **kw)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc


@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**40], ids=["finite", "overflow"])
def test_fp16_grad_scaler(init_scale):
    net = tiny_net(dtype=torch.float32, bn=True)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    ref, _ = reference(net, sam_sgd, dtype=torch.float16, scaler=ref_scaler)
    acc = fp16_accelerator(init_scale)
    model, opt, dl = acc.prepare(net, sam_sgd(net.parameters()), loader())
    step = SAMStep(acc, opt, model=model)

    def compute_loss(x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    for x, y in dl:
        step(compute_loss, x, y)
    assert_same(model, ref)
    assert acc.scaler.get_scale() == ref_scaler.get_scale()


def test_base_step_false_leaves_clip_and_step_to_the_caller():
    # transformers.Trainer-style: the *base* optimizer is prepared; the caller clips and steps.
    net = tiny_net(dtype=torch.float32, bn=True)
    ref, _ = reference(net, sam_sgd, max_grad_norm=0.05)
    acc = accelerate.Accelerator(cpu=True)
    model, base, dl = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader())
    sam = SAM(base.optimizer, rho=0.1)
    step = SAMStep(acc, sam, model=model, base_step=False)
    for x, y in dl:
        step(lambda x, y: F.cross_entropy(model(x), y), x, y)
        acc.clip_grad_norm_(model.parameters(), 0.05)
        base.step()
        base.zero_grad()
    assert_same(model, ref)


def test_base_step_false_overflow_makes_the_callers_scaler_skip():
    net = tiny_net(dtype=torch.float32, bn=False)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    ref, _ = reference(net, sam_sgd, dtype=torch.float16, scaler=ref_scaler)
    acc = fp16_accelerator(2.0**40)
    model, base, dl = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader())
    step = SAMStep(acc, SAM(base.optimizer, rho=0.1), model=model, base_step=False)

    def compute_loss(x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    skipped = []
    for x, y in dl:
        step(compute_loss, x, y)
        base.step()  # Accelerate: scaler.step(base) + scaler.update()
        skipped.append(acc.optimizer_step_was_skipped)
        base.zero_grad()
    assert_same(model, ref)
    assert acc.scaler.get_scale() == ref_scaler.get_scale()
    assert skipped[0]


def test_sam_built_before_prepare_is_relinked():
    net = tiny_net(dtype=torch.float32)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    sam = SAM(inner, rho=0.1)
    acc = accelerate.Accelerator(cpu=True)
    model, base = acc.prepare(net, inner)  # reloads the base's state dict: new param_groups
    SAMStep(acc, sam, model=model, base_step=False)
    assert sam.param_groups is inner.param_groups


def test_base_step_false_refuses_sam_clipping():
    net = tiny_net(dtype=torch.float32)
    acc = accelerate.Accelerator(cpu=True)
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        SAMStep(acc, sam_sgd(net.parameters(), max_grad_norm=1.0), base_step=False)


def test_example_script(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parent.parent / "examples" / "accelerate_train.py"
    main = runpy.run_path(str(script), run_name="example")["main"]
    main(
        [
            "--method",
            "ssam-random",
            "--epochs",
            "1",
            "--max-steps",
            "3",
            "--grad-accum",
            "2",
            "--mixed-precision",
            "bf16",
            "--cpu",
        ]
    )
    assert capsys.readouterr().out.startswith("epoch 0: loss")


def _ddp_worker(rank, world, port, out_dir):
    rank_env(rank, world, port)
    acc = accelerate.Accelerator(cpu=True)
    x, y = tiny_data(n=32, dtype=torch.float32)
    for ascent in ("local", "sync"):
        net = tiny_net(dtype=torch.float32)
        model, opt = acc.prepare(net, SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.5, ascent=ascent))
        step = SAMStep(acc, opt, model=model)
        for s in range(3):
            idx = [rank + world * (4 * s + j) for j in range(4)]
            step(lambda a, b: F.cross_entropy(model(a), b), x[idx], y[idx])
        torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"{ascent}-{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    # Two CPU processes (gloo, Accelerate's MULTI_CPU): with ascent="local" pass 1 skips the
    # all-reduce (each rank perturbs with its own gradient); pass 2 is all-reduced once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_ddp_worker, 2, port, str(tmp_path))
    net = tiny_net(dtype=torch.float32)
    expected = {a: list(ddp_reference(net, a, steps=3).parameters()) for a in ("local", "sync")}
    for ascent, other in (("local", "sync"), ("sync", "local")):
        ranks = [torch.load(tmp_path / f"{ascent}-{r}.pt") for r in range(2)]
        for p0, p1, q, o in zip(*ranks, expected[ascent], expected[other]):
            assert torch.equal(p0, p1)  # the ranks agree bit for bit
            torch.testing.assert_close(p0, q.detach(), rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(p, o, rtol=1e-4, atol=1e-5) for p, o in zip(ranks[0], expected[other]))


@pytest.mark.parametrize(
    "kind, version, reason",
    [
        ("DEEPSPEED", None, r"engine\.backward and then engine\.step\(\)"),
        ("MEGATRON_LM", None, r"accelerator\.backward does nothing"),
        ("FSDP", 1, r"fsdp_version=1 wraps the model in FSDP1.*plain tensors.*fsdp_version=2"),
        ("FSDP", 2, None),
    ],
)
def test_distributed_types_without_two_passes_are_refused_with_the_reason(kind, version, reason):
    # These need GPUs (and DeepSpeed / Megatron): the Accelerator's state says which one it runs,
    # and SAMStep reads it before it touches anything.
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = accelerate.Accelerator(cpu=True)
    acc.state.distributed_type = DistributedType(kind)
    if version is not None:
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
    net = tiny_net(dtype=torch.float32)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    if reason is None:  # FSDP2: DTensor parameters (run on 2 processes in test_integrations_fsdp.py)
        assert SAMStep(acc, opt, model=net).optimizer is opt
        return
    with pytest.raises(ValueError, match=reason):
        SAMStep(acc, opt, model=net)
    assert opt.model is None  # nothing was set up


def test_a_sequence_changing_variant_runs_without_edits_here():
    """A SAM subclass that runs one pass on odd steps (docs/design.md) works through SAMStep as in a
    plain ``opt.step(closure)`` loop: same passes, same weights."""
    from .test_train_passes import EveryOtherStepSAM

    def make(params, model):
        return EveryOtherStepSAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model)

    net = tiny_net(dtype=torch.float32, bn=True)
    ref = copy.deepcopy(net)
    ref_opt = make(ref.parameters(), ref)
    EveryOtherStepSAM.calls = []
    for x, y in loader():

        def closure(x=x, y=y):
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss

        ref_opt.step(closure)
        ref_opt.zero_grad()
    plain, EveryOtherStepSAM.calls = EveryOtherStepSAM.calls, []
    acc = accelerate.Accelerator(cpu=True)
    model, opt, dl = acc.prepare(net, make(net.parameters(), None), loader())
    step = SAMStep(acc, opt, model=model)
    for x, y in dl:
        step(lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert EveryOtherStepSAM.calls == plain == [[None], ["ascent", "descent"]] * 2
    assert_same(model, ref)


def msam_sgd(params, **kw):
    from sparsam import MSAM

    return MSAM(params, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, **kw)


def msam_reference(net, *, micro=1):
    """MSAM's own loop: ``opt.step(closure)`` with every micro-batch in the one closure call."""
    ref = copy.deepcopy(net)
    opt = msam_sgd(ref.parameters(), model=ref)
    for x, y in loader():

        def closure(x=x, y=y):
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(ref(xm), ym) / micro).backward()

        opt.zero_grad()
        opt.step(closure)
    return ref, opt


@pytest.mark.parametrize("micro", [1, 2], ids=["one_batch", "accumulate_2"])
def test_msam_runs_one_pass_per_step(micro):
    # MSAM through SAMStep: every micro-batch is computed once (no ascent pass), all of them at the
    # step's perturbed weights, and the result is MSAM's own opt.step(closure) loop, bit for bit.
    net = tiny_net(dtype=torch.float32, bn=micro == 1)
    ref, ref_opt = msam_reference(net, micro=micro)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=micro)
    model, opt, dl = acc.prepare(net, msam_sgd(net.parameters()), loader(batch=8 // micro))
    step = SAMStep(acc, opt, model=model)
    passes = []

    def loss_fn(x, y):
        passes.append(unwrap_optimizer(opt).current_pass)
        return F.cross_entropy(model(x), y)

    for x, y in dl:
        with acc.accumulate(model):
            step(loss_fn, x, y)
    assert passes == [None] * 4 * micro  # 4 steps, one pass per micro-batch
    assert unwrap_optimizer(opt).compute == ref_opt.compute == 4.0
    assert_same(model, ref)
