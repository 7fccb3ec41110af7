"""SAM, ASAM and SSAM on parameters sharded by FSDP2 (fully_shard, DTensor): 2 gloo processes on the
CPU against a single process that runs the same model on the whole batch. One spawn runs every
configuration (process start-up dominates the cost)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import DynamicMask, FisherMask, NormLayersMask, RandomMask, select
from sparsam.optim.schedule import ScheduledSAM, ScheduledSSAM
from .launch import spawn_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
if not hasattr(fsdp, "fully_shard") or not dist.is_available():
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)

WORLD, STEPS, BATCH = 2, 4, 12
CONFIGS = (
    "sam",
    "asam",
    "ssam-random",
    "ssam-random-masked-norm",
    "sam-bf16-policy",
    "sam-gradscaler",
    "sam-gradscaler-overflow",
    "ssam-fisher-ties",
    "ssam-fisher-channel",
    "ssam-fisher-bf16-policy",
    "ssam-fisher-true-after-step",
    "ssam-dynamic",
    "ssam-dynamic-layer",
    "ssam-dynamic-random-after-step",
    "sam-schedule",
    "ssam-fraction",
    "ssam-norm",
)
# Fisher samples: the first 2 input features are 0, so the first layer's columns 0 and 1 have zero
# Fisher information: 14 tied scores. Keeping 103 of the 107 coordinates takes every nonzero score
# (93) and the first 10 zeros in flat order: 8 in rank 0's rows (0-3) and 2 in rank 1's (row 4).
TIES_SPARSITY = 4 / 107


def make_model(config=""):
    torch.manual_seed(0)
    # 7 and 5 rows: shards of unequal size (FSDP2 pads the last one), and a bias of odd length
    if config == "ssam-norm":  # a LayerNorm (7 = 4 + 3 entries over the ranks) for the norm-layer mask
        return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def fisher_data(rank=0):
    """The Fisher samples rank ``rank`` is given: each rank its own, of which rank 0's are used."""
    x, y = batch(50 + rank)
    x[:, :2] = 0.0
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def make_mask(config):
    if "fisher" in config:
        if "channel" in config:  # rows of the weights (whole on one rank), the authors' overshoot
            kw = {"sparsity": 0.5, "pattern": "structured", "granularity": "channel", "fill": "overshoot"}
        elif "true" in config:  # labels drawn from the model's softmax; all-False mask at step 0
            kw = {"sparsity": 0.5, "true_fisher": True, "timing": "after-step", "seed": 4}
        else:
            kw = {"sparsity": TIES_SPARSITY}
        return FisherMask(num_samples=7, update_every=2, **kw)
    if "dynamic" in config:
        if config.endswith("after-step"):  # random drop and grow; each mask serves from the next step
            return DynamicMask(0.5, STEPS, update_every=1, drop="random", timing="after-step", seed=6)
        if config.endswith("layer"):
            return DynamicMask(0.5, STEPS, update_every=1, drop="weight", grow="gradient", budget="layer", seed=5)
        return DynamicMask(0.5, STEPS, update_every=1, seed=5)  # drop the smallest |g|, grow at random
    return RandomMask(0.5, seed=3, update_every=2)


def make_opt(config, params, model, rank=0):
    kw = {"rho": 0.2, "lr": 0.1, "momentum": 0.9, "model": model}
    if config == "sam-schedule":  # perturbs at steps 1 and 3 (start, every), rho ramped over 2 steps
        return ScheduledSAM(params, torch.optim.SGD, every=2, start=0.25, ramp=0.5, total_steps=STEPS, **kw)
    if config == "ssam-norm":  # SAM-ON: the LayerNorm's weight and bias only, no scores needed
        return SSAM(params, torch.optim.SGD, mask=NormLayersMask(), **kw)
    if config == "ssam-fraction":  # pass 1 on the first half of every rank's part of the batch
        mask = RandomMask(0.5, seed=3, update_every=2)
        return ScheduledSSAM(params, torch.optim.SGD, mask=mask, ascent_fraction=0.5, sparse_ascent=False, **kw)
    if "fisher" in config or "dynamic" in config:
        return SSAM(
            params, torch.optim.SGD, mask=make_mask(config), loss_fn=F.cross_entropy, data=fisher_data(rank), **kw
        )
    if config.startswith("ssam"):
        # a new random mask every 2 steps (global budget over all parameters)
        norm = "masked" if config.endswith("masked-norm") else "full"
        return SSAM(
            params, torch.optim.SGD, mask=RandomMask(0.5, seed=3, update_every=2), norm=norm, sparse_ascent=False, **kw
        )
    if "gradscaler" in config:
        kw["max_grad_norm"] = 0.5  # clipping of the (unscaled) sharded descent gradient
    return SAM(params, torch.optim.SGD, adaptive=config == "asam", **kw)


def make_scaler(config):
    if "gradscaler" not in config:
        return None
    # a CPU GradScaler stands in for the GPU one; an infinite scale overflows every ascent gradient
    return torch.amp.GradScaler("cpu", init_scale=float("inf") if config.endswith("overflow") else 2.0**10)


def all_masks(opt, model):
    """Every parameter's mask on this rank (SSAM holds none for a shard whose mask is all False)."""
    names, masks = opt.param_names(), opt.masks
    out = {}
    for p in model.parameters():
        shape = p.to_local().shape if hasattr(p, "to_local") else p.shape
        out[names[p]] = masks[names[p]].clone() if names[p] in masks else torch.zeros(shape, dtype=torch.bool)
    return out


def run(model, opt, rank=0, world=1, scaler=None):
    """STEPS steps on this rank's part of each batch; SSAM's masks after each step (per shard)."""
    history = []
    for step in range(STEPS):
        x, y = batch(step)

        def closure(x=x, y=y):
            # every rank its part of the batch, and of it the first batch_fraction (sub-batch ascent);
            # one process takes the same samples: each rank's first fraction, joined
            f = opt.batch_fraction
            ranks = range(WORLD) if world == 1 else [rank]
            xs = torch.cat([x.chunk(WORLD)[r][: math.ceil(f * len(x.chunk(WORLD)[r]))] for r in ranks])
            ys = torch.cat([y.chunk(WORLD)[r][: math.ceil(f * len(y.chunk(WORLD)[r]))] for r in ranks])
            loss = F.cross_entropy(model(xs), ys)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        opt.zero_grad()
        opt.step(closure, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        if isinstance(opt, SSAM):
            history.append(all_masks(opt, model))
    return history


def sharded_model(bf16=False, config=""):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mp_policy": policy} if policy is not None else {}
    model = make_model(config)  # the LayerNorm of "ssam-norm" is sharded with the root
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _checkpoint(opt):
    """Save and load SSAM's state on the same sharding; then a state whose masks have another shard shape."""
    sd = opt.state_dict()
    model = sharded_model()
    again = make_opt("ssam-random", model.parameters(), model)
    again.load_state_dict(sd)
    same = again._steps == opt._steps and all(torch.equal(again.masks[n], m) for n, m in opt.masks.items())
    bad = dict(sd)
    bad["sparsam"] = {**sd["sparsam"], "masks": {**sd["sparsam"]["masks"], 0: torch.ones(2, 6, dtype=torch.bool)}}
    try:
        again.load_state_dict(bad)
        return same, None
    except ValueError as exc:
        return same, str(exc)


def _errors(model, rank):
    """Bad input on sharded parameters: each entry is the message of the error raised, or None."""
    out = {}
    extra = nn.Linear(3, 2)  # a plain parameter next to sharded ones: the norm cannot count it
    bad = make_opt("sam", list(model.parameters()) + list(extra.parameters()), model)
    x, _ = batch(0)
    F.cross_entropy(extra(model(x)), torch.zeros(BATCH, dtype=torch.long)).backward()
    try:
        bad.first_step()
        out["mixed"] = None
    except ValueError as exc:
        out["mixed"] = str(exc)
    ssam = make_opt("ssam-random", model.parameters(), model)
    for key, masks in (
        ("full-shape", {"0.weight": torch.ones(7, 6, dtype=torch.bool)}),
        ("other-world", {"0.weight": torch.ones(2, 6, dtype=torch.bool)}),
    ):
        try:
            ssam.set_masks(masks)
            out[key] = None
        except ValueError as exc:
            out[key] = str(exc)
    # the cheaper ascent pass would freeze shards rank by rank: refused when built, on every rank
    # alike (before any collective), and off by default with norm="masked"
    kw = dict(rho=0.1, lr=0.1, model=model, norm="masked", mask=RandomMask(0.5, seed=3, pattern="structured"))
    try:
        SSAM(model.parameters(), torch.optim.SGD, sparse_ascent=True, **kw)
        out["sparse-ascent"] = None
    except ValueError as exc:
        out["sparse-ascent"] = str(exc)
    out["sparse-ascent-default"] = SSAM(model.parameters(), torch.optim.SGD, **kw).sparse_ascent
    return out


def select_scores():
    """Full scores for the selection cases: integer-valued (long runs of ties), 7 and 5 rows."""
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randint(0, 3, (7, 6), generator=g).float(),
        "b": torch.randint(0, 3, (7,), generator=g).float(),
        "c": torch.zeros(5, 8),  # all tied
        "d": torch.randint(0, 4, (5, 2, 3), generator=g).double(),
    }


SELECT_CASES = {
    "global": {"sparsity": 0.4},
    "layer": {"sparsity": 0.7, "budget": "layer"},
    "one-d-always": {"sparsity": 0.5, "one_d": "always"},
    "channel": {"sparsity": 0.5, "pattern": "structured", "granularity": "channel"},
    "channel-overshoot": {"sparsity": 0.3, "pattern": "structured", "granularity": "channel", "fill": "overshoot"},
    "channel-layer": {"sparsity": 0.5, "pattern": "structured", "granularity": "channel", "budget": "layer"},
    "2:4": {"sparsity": None, "pattern": "2:4"},
    "1:2-rank": {"sparsity": None, "pattern": "1:2", "one_d": "rank"},  # b: shards of 4 and 3
}


def _select_cases(rank):
    """select() on DTensor scores: each rank's parts (joined and checked by the test), and the
    errors of what is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded(full):
        part = full.chunk(WORLD)[rank] if rank < len(full.chunk(WORLD)) else full[:0]
        return DTensor.from_local(part.clone(), mesh, [Shard(0)], shape=full.shape, stride=full.stride())

    scores = {k: sharded(v) for k, v in select_scores().items()}
    out = {}
    for case, kw in SELECT_CASES.items():
        kw = dict(kw)
        masks = select(scores, kw.pop("sparsity"), **kw)
        out[case] = {k: (type(m).__name__, m.shape, m.to_local().clone()) for k, m in masks.items()}
    errors = {}
    nan = dict(scores)
    if rank == 1:  # NaN on one rank only: both raise
        nan["a"] = sharded(select_scores()["a"].index_fill(0, torch.tensor([6]), float("nan")))
    for key, call in (
        ("tensor", lambda: select(scores, 0.5, "structured")),
        ("1-d-crossing", lambda: select({"b": scores["b"]}, None, "1:3", one_d="rank")),
        ("nan", lambda: select(nan, 0.5)),
    ):
        try:
            call()
            errors[key] = None
        except ValueError as exc:
            errors[key] = str(exc)
    out["errors"] = errors
    return out


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for config in CONFIGS:
            model = sharded_model(bf16=config.endswith("bf16-policy"), config=config)
            opt = make_opt(config, model.parameters(), model, rank)
            history = run(model, opt, rank, world, make_scaler(config))
            if config == "ssam-random":
                result["checkpoint"] = _checkpoint(opt)
            result[config] = {
                "params": [p.full_tensor() for p in model.parameters()],
                "backup_bytes": sum(b.numel() * b.element_size() for b in opt._backup.values()),
                "masks": {n: m.clone() for n, m in opt.masks.items()} if isinstance(opt, SSAM) else None,
                "history": history,
                "local_shapes": [tuple(p.to_local().shape) for p in model.parameters()],
            }
        result["errors"] = _errors(sharded_model(), rank)
        result["select"] = _select_cases(rank)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_worker, WORLD, free_port(), str(out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_two_ranks_equal_one_process(config, ranks):
    ref = make_model(config)
    ref_opt = make_opt(config, ref.parameters(), ref)
    history = run(ref, ref_opt, scaler=make_scaler(config))
    if config.endswith("overflow"):  # every step skipped by the scaler: the initial weights
        assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), make_model().parameters()))
    r0, r1 = ranks[0][config], ranks[1][config]
    # bf16 compute (FSDP's MixedPrecisionPolicy) against the float32 run: as close as bf16 allows
    tol = {"rtol": 0, "atol": 2e-2} if config.endswith("bf16-policy") else {"rtol": 1e-5, "atol": 1e-6}
    for p0, p1, q in zip(r0["params"], r1["params"], ref.parameters()):
        assert torch.equal(p0, p1)  # every rank gathers the same weights
        assert p0.dtype == torch.float32  # the sharded parameters stay float32 under the policy
        torch.testing.assert_close(p0, q.detach(), **tol)
    if config.endswith("bf16-policy"):  # the forward did run in bf16: not the float32 weights
        assert any(
            not torch.allclose(p0, q.detach(), rtol=1e-5, atol=1e-6) for p0, q in zip(r0["params"], ref.parameters())
        )
    # the copy of w is one shard per rank: together the ranks hold exactly one copy
    param_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    if config.startswith("ssam"):
        # each rank holds the masks of its rows only; joined they are the one-process masks
        # (a rank holds no mask for a shard whose mask is all False)
        for name, m in ref_opt.masks.items():
            parts = [r["masks"].get(name, torch.zeros(0, *m.shape[1:], dtype=torch.bool)) for r in (r0, r1)]
            if all(name in r["masks"] for r in (r0, r1)):
                assert torch.equal(torch.cat(parts), m), name
                assert r0["masks"][name].shape[0] < m.shape[0]
        assert sum(r["backup_bytes"] for r in (r0, r1)) <= param_bytes  # only partly masked tensors copied
        # Fisher and dynamic masks chosen per shard by the distributed threshold: at every step
        for step, ref_masks in enumerate(history):
            m0, m1 = r0["history"][step], r1["history"][step]
            assert m0.keys() == ref_masks.keys(), step
            for name, m in ref_masks.items():
                assert torch.equal(torch.cat([m0[name], m1[name]]), m), (step, name)
        if "fisher" in config and "channel" not in config and "true" not in config:
            # the 14 tied zeros of layer 0 (columns 0, 1): the first 10 in flat order, over both ranks
            for masks in history:
                assert sum(int(m.sum()) for m in masks.values()) == 103
                assert masks["0.weight"][:5, :2].all() and not masks["0.weight"][5:, :2].any()
        if config == "ssam-norm":  # all True on the LayerNorm's shards, all False (no mask held) elsewhere
            for r in (r0, r1):
                assert set(r["masks"]) == {"1.weight", "1.bias"} and all(m.all() for m in r["masks"].values())
                assert all(not m.any() for n, m in r["history"][-1].items() if not n.startswith("1."))
    else:
        assert sum(r["backup_bytes"] for r in (r0, r1)) == param_bytes
        assert all(r["backup_bytes"] < param_bytes for r in (r0, r1))
    assert r0["local_shapes"][0] == (4, 6) and r1["local_shapes"][0] == (3, 6)


@pytest.mark.slow
def test_bad_input_is_refused_by_name(ranks):
    for r in ranks:
        err = r["errors"]
        assert err["mixed"] and "sharded (FSDP2) and plain parameters" in err["mixed"] and "(2, 3)" in err["mixed"]
        assert err["full-shape"] and "full shape (7, 6)" in err["full-shape"] and "per shard" in err["full-shape"]
        assert err["other-world"] and "another world size" in err["other-world"]
        assert err["sparse-ascent"] and "sparse_ascent=False" in err["sparse-ascent"]
        assert err["sparse-ascent-default"] is False


@pytest.mark.slow
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_on_sharded_scores_is_the_one_process_selection(case, ranks):
    kw = dict(SELECT_CASES[case])
    full = select_scores()
    ref = select(full, kw.pop("sparsity"), **kw)
    p0, p1 = ranks[0]["select"][case], ranks[1]["select"][case]
    assert p0.keys() == ref.keys()
    for name, m in ref.items():
        assert p0[name][0] == "DTensor" and p0[name][1] == m.shape  # sharded like the scores
        assert torch.equal(torch.cat([p0[name][2], p1[name][2]]), m), name


@pytest.mark.slow
def test_select_on_sharded_scores_refuses_what_it_cannot_match(ranks):
    for r in ranks:
        err = r["select"]["errors"]
        assert err["tensor"] and "granularity='tensor'" in err["tensor"] and "channel" in err["tensor"]
        assert err["1-d-crossing"] and "'b'" in err["1-d-crossing"] and "[0, 4]" in err["1-d-crossing"]
        assert err["nan"] and "scores['a'] contains NaN" in err["nan"]  # raised on both ranks


@pytest.mark.slow
def test_ssam_state_round_trip_per_shard(ranks):
    for r in ranks:
        same, err = r["checkpoint"]
        assert same  # masks (per shard) and the step count come back
        assert err and "another world size" in err


def _dcp_worker(rank, world, port, out, phase):
    """phase "save": 2 ranks train SSAM 2 steps, save through torch.distributed.checkpoint, then train
    2 more (the uninterrupted run). phase "resume": 1 rank loads that checkpoint (resharded) and
    trains the last 2 steps on the whole batch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = sharded_model()
        opt = make_opt("ssam-random", model.parameters(), model)

        def steps(first, last):
            for step in range(first, last):
                x, y = batch(step)
                xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

                def closure(xs=xs, ys=ys):
                    loss = F.cross_entropy(model(xs), ys)
                    loss.backward()
                    return loss

                opt.zero_grad()
                opt.step(closure)

        if phase == "save":
            steps(0, 2)
            model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
            dcp.save(
                {"model": model_sd, "optim": optim_sd, "sparsam": opt.state_dict()["sparsam"]},
                checkpoint_id=f"{out}/ckpt",
            )
            steps(2, STEPS)
        else:
            opt.init_masks()  # the template needs masks of this run's shard shapes to load into
            model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
            sd = {"model": model_sd, "optim": optim_sd, "sparsam": opt.state_dict()["sparsam"]}
            dcp.load(sd, checkpoint_id=f"{out}/ckpt")
            set_state_dict(model, opt.base_optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            opt.load_state_dict({**opt.base_optimizer.state_dict(), "sparsam": sd["sparsam"]})
            steps(2, STEPS)
        full = [p.full_tensor() for p in model.parameters()]
        torch.save({"params": full, "steps": opt._steps}, f"{out}/{phase}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_checkpoint_resumes_at_another_world_size(tmp_path):
    spawn_ranks(_dcp_worker, 2, free_port(), str(tmp_path), "save")
    spawn_ranks(_dcp_worker, 1, free_port(), str(tmp_path), "resume", nprocs=1)
    full = torch.load(tmp_path / "save0.pt")
    resumed = torch.load(tmp_path / "resume0.pt")
    assert resumed["steps"] == full["steps"] == STEPS
    for p, q in zip(resumed["params"], full["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
