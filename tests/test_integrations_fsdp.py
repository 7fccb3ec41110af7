"""SAM and SSAM under the frameworks' FSDP2 paths, 2 gloo processes on the CPU against one process
running the whole batch: Lightning's ``ModelParallelStrategy`` (``fully_shard`` in
``configure_model``) with ``SAMCallback``, and Accelerate's FSDP plugin with ``fsdp_version=2`` with
``SAMStep``; and the Lightning strategy's refusal to resume from its checkpoints, which cannot
carry SAM. The refusals of FSDP1 (Lightning's ``FSDPStrategy``, ``fsdp_version=1``), DeepSpeed,
Megatron-LM and XLA need GPUs or packages absent here; they are tested in one process in
``test_integrations_lightning.py`` and ``test_integrations_accelerate.py``."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsam import SAM, SSAM
from sparsam.masks import RandomMask

from .reference import tiny_data, tiny_net
from .launch import rank_env, spawn_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
if not hasattr(fsdp, "fully_shard") or not dist.is_available():
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)

WORLD, STEPS, PER_RANK = 2, 3, 4
CLIP = 0.3  # Lightning's gradient_clip_val; the reference clips with SAM's max_grad_norm


def make_opt(config, params, model=None, *, clip=False):
    kw = {"rho": 0.5, "lr": 0.2, "momentum": 0.9, "model": model}
    if config.startswith("ssam"):  # a new random mask (global budget) every 2 steps
        return SSAM(params, torch.optim.SGD, mask=RandomMask(0.5, seed=3, update_every=2), **kw)
    if clip:  # the reference's clipping of the descent gradient (Lightning's is gradient_clip_val)
        kw["max_grad_norm"] = CLIP
    return SAM(params, torch.optim.SGD, **kw)


def global_batch(step, micro=1):
    """The samples both ranks read at ``step``: rank r reads r, r + 2, ... (a DistributedSampler
    without shuffling), so one process reads 8·step ... 8·step + 7 (the mean does not see the order)."""
    x, y = tiny_data(n=WORLD * PER_RANK * STEPS * micro, dtype=torch.float32)
    n = WORLD * PER_RANK * micro
    return x[step * n : (step + 1) * n], y[step * n : (step + 1) * n]


def rank_batch(step, rank, micro=1):
    x, y = global_batch(step, micro)
    return x[rank::WORLD], y[rank::WORLD]


def reference(config, micro=1):
    """One process, the whole batch, ``opt.step(closure)``: weights and SSAM's masks after STEPS steps."""
    net = tiny_net(dtype=torch.float32)
    opt = make_opt(config, net.parameters(), net, clip=config.endswith("-clip"))
    for step in range(STEPS):
        x, y = global_batch(step, micro)

        def closure(x=x, y=y):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss.detach()

        opt.zero_grad()
        opt.step(closure)
    masks = dict(opt.masks) if isinstance(opt, SSAM) else {}
    return [p.detach() for p in net.parameters()], masks


def full_masks(opt, params):
    """SSAM's per-shard masks on this rank, by parameter name (all-False where SSAM holds none)."""
    names, masks = opt.param_names(), opt.masks
    return {
        names[p].removeprefix("net."): masks.get(names[p], torch.zeros(p.to_local().shape, dtype=torch.bool)).clone()
        for p in params
    }


def setup_rank(rank, port):
    rank_env(rank, WORLD, port)


def spawn(worker, out_dir, *args):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(worker, port, str(out_dir), *args, nprocs=WORLD)


def check(out_dir, config, micro=1):
    """Both ranks hold the one-process weights (full tensors) and, per shard, its masks."""
    weights, masks = reference(config, micro)
    for rank in range(WORLD):
        got = torch.load(os.path.join(out_dir, f"{config}-{rank}.pt"))
        for p, q in zip(got["weights"], weights, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for name, m in got["masks"].items():  # FSDP2 shards dim 0 in torch.chunk order
            full = masks.get(name, torch.zeros(got["shapes"][name], dtype=torch.bool))
            assert torch.equal(m, torch.chunk(full, WORLD)[rank]), f"{config}: mask of {name} on rank {rank}"
        assert len(got["masks"]) == (4 if config.startswith("ssam") else 0)
    return weights


# ---------------------------------------------------------------------------- Lightning, FSDP2
LIGHTNING_CONFIGS = ("sam-clip", "ssam-random")


def _lightning_worker(rank, port, out_dir):
    setup_rank(rank, port)
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from sparsam.integrations.lightning import SAMCallback

    class Sharded(L.LightningModule):
        def __init__(self, config):
            super().__init__()
            self.net = tiny_net(dtype=torch.float32)
            self.config = config

        def configure_model(self):  # FSDP2 over the strategy's data-parallel mesh
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return make_opt(self.config, self.parameters())

        def train_dataloader(self):
            x, y = tiny_data(n=WORLD * PER_RANK * STEPS, dtype=torch.float32)
            ds = TensorDataset(x, y)
            return DataLoader(ds, batch_size=PER_RANK, sampler=DistributedSampler(ds, shuffle=False))

    def make_trainer(clip=None, checkpoints=False):
        return L.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
            max_steps=STEPS,
            gradient_clip_val=clip,
            callbacks=[SAMCallback()],
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=checkpoints,
            default_root_dir=out_dir,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    # Resuming is refused with the reason before anything is read (the strategy's checkpoints
    # cannot carry SAM), and writing checkpoints warns.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make_trainer(checkpoints=True).fit(Sharded("sam"), ckpt_path=os.path.join(out_dir, "none.ckpt"))
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
    warned = any("a run cannot resume from them" in str(w.message) for w in caught)
    torch.save({"refusal": refusal, "warned": warned}, os.path.join(out_dir, f"resume-{rank}.pt"))

    for config in LIGHTNING_CONFIGS:
        module = Sharded(config)
        trainer = make_trainer(clip=CLIP if config.endswith("clip") else None)
        trainer.fit(module)
        opt = trainer.optimizers[0]
        params = list(module.net.parameters())
        torch.save(
            {
                "weights": [p.full_tensor().detach() for p in params],
                "masks": full_masks(opt, params) if isinstance(opt, SSAM) else {},
                "shapes": {n: tuple(p.shape) for n, p in module.net.named_parameters()},
                "sharded": all(type(p).__name__ == "DTensor" for p in params),
                "steps": trainer.global_step,
            },
            os.path.join(out_dir, f"{config}-{rank}.pt"),
        )


@pytest.mark.slow
def test_lightning_model_parallel_strategy_fsdp2(tmp_path):
    pytest.importorskip("lightning")
    spawn(_lightning_worker, tmp_path)
    for config in LIGHTNING_CONFIGS:
        check(tmp_path, config)
        got = torch.load(tmp_path / f"{config}-0.pt")
        assert got["sharded"] and got["steps"] == STEPS
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"resume-{rank}.pt")
        assert "cannot resume SAM" in got["refusal"] and "optimizer.step(closure=None)" in got["refusal"]
        assert got["warned"] == (rank == 0)  # rank_zero_warn


# --------------------------------------------------------------------------- Accelerate, FSDP2
ACCELERATE_CONFIGS = (("sam", 1), ("ssam-random", 2))  # (optimizer, gradient_accumulation_steps)


def _accelerate_worker(rank, port, out_dir):
    setup_rank(rank, port)
    import accelerate
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from sparsam.integrations.accelerate import SAMStep

    for config, micro in ACCELERATE_CONFIGS:
        AcceleratorState._reset_state()
        GradientState._reset_state()
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        acc = accelerate.Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=micro)
        # Accelerate turns its FSDP plugin on for accelerators only (on the CPU it runs DDP): switch
        # its FSDP2 path on by hand, so that prepare() shards the model as it does on GPUs.
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        assert acc.is_fsdp2
        net = tiny_net(dtype=torch.float32)
        model, opt = acc.prepare(net, make_opt(config, net.parameters()))
        sam_step = SAMStep(acc, opt, model=model)
        for step in range(STEPS):
            x, y = rank_batch(step, rank, micro)
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with acc.accumulate(model):
                    sam_step(lambda a, b: F.cross_entropy(model(a), b), xm, ym)
        sam = sam_step.optimizer
        params = list(model.parameters())
        torch.save(
            {
                "weights": [p.full_tensor().detach() for p in params],
                "masks": full_masks(sam, params) if isinstance(sam, SSAM) else {},
                "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
                "sharded": all(type(p).__name__ == "DTensor" for p in params),
            },
            os.path.join(out_dir, f"{config}-{rank}.pt"),
        )


@pytest.mark.slow
def test_accelerate_fsdp2_plugin(tmp_path):
    pytest.importorskip("accelerate")
    spawn(_accelerate_worker, tmp_path)
    for config, micro in ACCELERATE_CONFIGS:
        check(tmp_path, config, micro)
        assert torch.load(tmp_path / f"{config}-0.pt")["sharded"]
