"""SAMTrainer (sparsam.integrations.transformers) on tiny transformers built from a config (random
weights, nothing downloaded), compared with a hand-written two-pass loop on a copy of the same model
fed the same batches; checkpoint/resume against an uninterrupted run; PEFT LoRA adapters."""

from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'sparsam[hf]')")

from accelerate.state import AcceleratorState, GradientState

from sparsam import MSAM, SAM, SSAM, SparseMSAM
from sparsam.integrations.transformers import SPARSAM_STATE_NAME, SAMTrainer
from sparsam.masks import DynamicMask, FisherMask, RandomMask
from sparsam.optim.esam import ESAM
from sparsam.optim.looksam import LookSAM, LookSSAM
from sparsam.optim.schedule import ScheduledSAM

from .launch import rank_env, spawn_ranks

BATCH, ACCUM, SEQ, VOCAB = 4, 2, 8, 40


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide singletons; every Trainer builds its own Accelerator.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_bert(seed=0):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def cls_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def lm_data(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # some ignored targets, so normalising by the token count matters
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def args(out, **kw):
    base = {
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUM,
        "max_steps": 3,
        "learning_rate": 0.05,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "lr_scheduler_type": "linear",
        "weight_decay": 0.0,
        "max_grad_norm": 0.5,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "train_sampling_strategy": "sequential",
        "disable_tqdm": True,
        "logging_strategy": "no",
        "seed": 0,
    }
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def window_loss(model, window, autocast=None):
    """The losses the Trainer backpropagates for the micro-batches of one accumulation window.

    Causal LM (GPT-2 takes loss kwargs): each micro-batch's summed cross-entropy over its shifted
    targets divided by the number of targets in the whole window (``num_items_in_batch``).
    Sequence classification (BERT's head ignores ``num_items_in_batch``): each micro-batch's mean
    cross-entropy, not divided by the number of micro-batches, because the Trainer treats a model
    that accepts loss kwargs as normalising by itself. ``test_rho_zero_is_the_plain_trainer`` pins
    both against the plain Trainer.
    """
    lm = window[0]["labels"].dim() == 2  # token labels: a causal LM (targets shifted by one)
    total = sum(int(mb["labels"][:, 1:].ne(-100).sum()) for mb in window) if lm else None
    losses = []
    for mb in window:
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            logits = model(input_ids=mb["input_ids"]).logits
        logits = logits.float()
        if lm:
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), mb["labels"][:, 1:].reshape(-1), reduction="sum")
            losses.append(ce / total)
        else:
            losses.append(F.cross_entropy(logits, mb["labels"]))
    return losses


def batches(data, steps):
    per_step = BATCH * ACCUM
    out = []
    for s in range(steps):
        chunk = data[s * per_step : (s + 1) * per_step]
        out.append(
            [
                {k: torch.stack([d[k] for d in chunk[i : i + BATCH]]) for k in chunk[0]}
                for i in range(0, per_step, BATCH)
            ]
        )
    return out


def reference(model, make_sam, data, *, steps=3, lr=0.05, max_grad_norm=0.5, autocast=None):
    """The two-step loop, one SAM step per accumulation window, with the Trainer's linear LR decay."""
    ref = copy.deepcopy(model)
    # The Trainer's two groups (weights with decay, then biases and norms), in its order: the order
    # decides which random scores a RandomMask draws for which parameter.
    decay = set(transformers.Trainer.get_decay_parameter_names(None, ref))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    params = [p for g in groups for p in g["params"]]
    sam = make_sam(torch.optim.SGD(groups, lr=lr, momentum=0.9))
    sam.model = ref
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda t: max(0.0, (steps - t) / steps))
    ref.train()
    for window in batches(data, steps):
        sam.zero_grad()
        with sam.ascent_pass():
            for loss in window_loss(ref, window, autocast):
                loss.backward()
        sam.first_step(zero_grad=True)
        with sam.descent_pass():
            for loss in window_loss(ref, window, autocast):
                loss.backward()
        sam.second_step(base_step=False)  # restores w; the base step comes after the Trainer-style clip
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # the Trainer clips the descent gradient
        sam.base_optimizer.step()
        sched.step()
    return ref, sam


def assert_close(a, b, **tol):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m, k=k: f"{k}: {m}", **(tol or {"rtol": 1e-5, "atol": 1e-6}))


def sam_factory(base):
    return SAM(base, rho=0.1)


def ssam_factory(base):
    return SSAM(base, rho=0.1, mask=RandomMask(0.5, seed=3))


def ssam_fisher_factory(base):
    # SSAM-F on a transformer: the Fisher mask takes (input_ids, labels) batches and a loss on the
    # model's logits; model= is handed over by SAMTrainer (and by the reference loop)
    fisher_data = cls_data(8, seed=5)
    ids = torch.stack([d["input_ids"] for d in fisher_data])
    labels = torch.stack([d["labels"] for d in fisher_data])
    return SSAM(
        base,
        rho=0.1,
        mask=FisherMask(0.5, num_samples=8),
        loss_fn=lambda out, y: F.cross_entropy(out.logits, y),
        data=[(ids, labels)],
    )


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention (Fisher)
@pytest.mark.parametrize("make_sam", [sam_factory, ssam_factory, ssam_fisher_factory], ids=["sam", "ssam", "ssam-f"])
def test_trainer_equals_two_pass_loop(make_sam, tmp_path):
    model, data = tiny_bert(), cls_data(3 * BATCH * ACCUM)
    ref, ref_sam = reference(model, make_sam, data)
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=make_sam)
    trainer.train()
    assert trainer.state.global_step == 3
    assert_close(model, ref)
    if isinstance(ref_sam, SSAM):
        ours = trainer.sam_optimizer.masks
        assert ours.keys() == ref_sam.masks.keys() and ours
        assert all(torch.equal(ours[k], ref_sam.masks[k]) for k in ours)


def sample_ce(outputs, inputs):
    return F.cross_entropy(outputs.logits, inputs["labels"], reduction="none")


def esam_factory(base):
    return ESAM(base, rho=0.1, beta=0.6, gamma=0.5, seed=3)


def test_esam_data_selection_equals_the_contract_loop(tmp_path):
    """ESAM with gamma = 0.5 through the Trainer (2 micro-batches of 4 per step): the per-sample
    losses of both micro-batches at w and at w + e, pass 2 on the 4 of 8 whose loss rose most;
    the reference runs ESAM's step on the window's 8 samples with the closure of docs/variants.md."""
    model, data = tiny_bert(), cls_data(3 * BATCH * ACCUM)
    ref = copy.deepcopy(model)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, ref))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    sam = esam_factory(torch.optim.SGD(groups, lr=0.05, momentum=0.9))
    sam.model = ref
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda t: max(0.0, (3 - t) / 3))
    ref.train()
    for window in batches(data, 3):
        ids = torch.cat([mb["input_ids"] for mb in window])
        labels = torch.cat([mb["labels"] for mb in window])

        def closure(ids=ids, labels=labels):
            if sam.current_pass == "measure":
                sam.record_sample_losses(F.cross_entropy(ref(input_ids=ids).logits, labels, reduction="none"))
                return None
            idx = sam.batch_index
            i, y = (ids, labels) if idx is None else (ids[idx], labels[idx])
            losses = F.cross_entropy(ref(input_ids=i).logits, y, reduction="none")
            if sam.wants_sample_losses:
                sam.record_sample_losses(losses)
            loss = losses.mean()
            loss.backward()
            return loss

        sam.zero_grad()
        sam.step(closure, base_step=False)
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 0.5)
        sam.base_optimizer.step()
        sched.step()
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=esam_factory, sample_loss=sample_ce)
    trainer.train()
    assert_close(model, ref)
    assert trainer.sam_optimizer.compute == pytest.approx(sam.compute) == 3 * (1 + 1 / 3 + 0.5)


def test_looksam_reuse_steps_and_sub_batch_ascent_through_the_trainer(tmp_path):
    """LookSAM k = 2 with ascent_fraction 0.5 under the Trainer (base_step=False, the Trainer clips
    and steps): pass 1 on the first half of each micro-batch, and step 1 reuses the g_v stored at
    step 0 exactly as LookSAM's own step with base_step=True does."""
    model, data = tiny_bert(), cls_data(3 * BATCH * ACCUM)
    ref = copy.deepcopy(model)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, ref))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    # max_grad_norm: the Trainer's clip of the descent (or reuse) gradient, before the base step
    sam = LookSAM(torch.optim.SGD(groups, lr=0.05, momentum=0.9), rho=0.1, k=2, ascent_fraction=0.5, max_grad_norm=0.5)
    sam.model = ref
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda t: max(0.0, (3 - t) / 3))
    ref.train()
    for window in batches(data, 3):

        def closure(window=window):
            if sam.current_pass == "ascent":  # the first half of every micro-batch
                window = [{k: v[: BATCH // 2] for k, v in mb.items()} for mb in window]
            for loss in window_loss(ref, window):
                loss.backward()

        sam.zero_grad()
        sam.step(closure)
        sched.step()
    trainer = SAMTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=data,
        sam=lambda base: LookSAM(base, rho=0.1, k=2, ascent_fraction=0.5),
    )
    trainer.train()
    assert_close(model, ref)
    assert trainer.sam_optimizer.compute == sam.compute == 1.5 + 1 + 1.5


CHEAPER = {
    # every 2nd step without ascent, and the ascent on the first half of each micro-batch
    "every2-asc": lambda base, **kw: ScheduledSAM(base, rho=0.1, every=2, ascent_fraction=0.5, **kw),
    # plain steps for the first quarter, then rho ramped up over half of the 4 steps
    "late-ramp": lambda base, **kw: ScheduledSAM(base, rho=0.1, start=0.25, ramp=0.5, total_steps=4, **kw),
    "lookssam": lambda base, **kw: LookSSAM(base, rho=0.1, k=2, mask=RandomMask(0.5, seed=3), **kw),
    "esam-swp": lambda base, **kw: ESAM(base, rho=0.1, beta=0.6, gamma=1.0, seed=3, **kw),
    # one pass per step, at weights moved against the momentum; sparse: SSAM's random mask
    "msam": lambda base, **kw: MSAM(base, rho=0.5, **kw),
    "smsam": lambda base, **kw: SparseMSAM(base, rho=0.5, mask=RandomMask(0.5, seed=3), **kw),
}


@pytest.mark.parametrize("name", sorted(CHEAPER))
def test_cheaper_sams_through_the_trainer_equal_their_own_step(name, tmp_path):
    """Schedules (every k with sub-batch ascent; late start with a rho ramp), LookSSAM and ESAM's random weight subsets (gamma = 1)
    under the Trainer (2 micro-batches of 4 per step, 4 steps) against the variant's own
    ``step(closure)`` in a hand-written loop: its ``max_grad_norm`` is the Trainer's clip of the
    descent gradient, and the closure cuts each micro-batch to ``ceil(batch_fraction · 4)``."""
    steps = 4
    model, data = tiny_bert(), cls_data(steps * BATCH * ACCUM)
    ref = copy.deepcopy(model)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, ref))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    sam = CHEAPER[name](torch.optim.SGD(groups, lr=0.05, momentum=0.9), max_grad_norm=0.5)
    sam.model = ref
    sched = torch.optim.lr_scheduler.LambdaLR(sam.base_optimizer, lambda t: max(0.0, (steps - t) / steps))
    ref.train()
    for window in batches(data, steps):

        def closure(window=window):
            n = math.ceil(sam.batch_fraction * BATCH)
            for loss in window_loss(ref, [{k: v[:n] for k, v in mb.items()} for mb in window]):
                loss.backward()

        sam.zero_grad()
        sam.step(closure)
        sched.step()
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, max_steps=steps), train_dataset=data, sam=lambda base: CHEAPER[name](base)
    )
    trainer.train()
    assert trainer.state.global_step == steps
    assert_close(model, ref)
    ours = trainer.sam_optimizer
    assert type(ours) is type(sam) and ours.compute == pytest.approx(sam.compute)
    if name != "esam-swp":  # ESAM's saving with gamma = 1 is in the weights, not in the passes it counts
        assert ours.compute < 2 * steps
    if name == "lookssam":
        assert ours.masks.keys() == sam.masks.keys() and ours.masks
        assert all(torch.equal(ours.masks[k], sam.masks[k]) for k in ours.masks)


def test_msam_runs_one_pass_per_micro_batch(tmp_path):
    # SAMTrainer with MSAM: each micro-batch is forwarded once per step (no ascent pass), and
    # compute counts one SGD step per step.
    steps = 3
    model, data = tiny_bert(), cls_data(steps * BATCH * ACCUM)
    forwards = []
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, max_steps=steps), train_dataset=data, sam=lambda base: MSAM(base, rho=0.5)
    )
    trainer.train()
    assert trainer.state.global_step == steps
    assert len(forwards) == steps * ACCUM
    assert trainer.sam_optimizer.compute == steps


def test_esam_data_selection_needs_sample_loss(tmp_path):
    trainer = SAMTrainer(model=tiny_bert(), args=args(tmp_path), train_dataset=cls_data(8), sam=esam_factory)
    with pytest.raises(ValueError, match=r"gamma=0.5.*sample_loss="):
        trainer.train()
    bad = SAMTrainer(
        model=tiny_bert(),
        args=args(tmp_path),
        train_dataset=cls_data(8),
        sam=esam_factory,
        sample_loss=lambda out, inp: out.logits,
    )
    with pytest.raises(ValueError, match=r"1-D tensor of length 4.*shape \(4, 3\)"):
        bad.train()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_rho_zero_is_the_plain_trainer(kind, tmp_path):
    # With rho = 0 nothing is perturbed: pass 2 recomputes pass 1's gradient, so SAMTrainer must
    # reproduce the Trainer's own step (its loss normalisation, accumulation, clipping, AdamW, schedule).
    make_model, make_data = (tiny_bert, cls_data) if kind == "bert" else (tiny_gpt2, lm_data)
    data = make_data(3 * BATCH * ACCUM)
    plain, ours = make_model(), make_model()
    kw = {"optim": "adamw_torch", "optim_args": None, "weight_decay": 0.1}
    transformers.Trainer(model=plain, args=args(tmp_path / "a", **kw), train_dataset=data).train()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    SAMTrainer(model=ours, args=args(tmp_path / "b", **kw), train_dataset=data, rho=0.0).train()
    assert_close(ours, plain)
    # and the reference loop's loss is the plain Trainer's
    ref, _ = reference(make_model(), lambda base: SAM(base, rho=0.0), data)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    plain = make_model()
    transformers.Trainer(model=plain, args=args(tmp_path / "c"), train_dataset=data).train()
    assert_close(plain, ref)


def test_causal_lm_token_normalisation(tmp_path):
    # GPT-2 takes loss kwargs: the Trainer normalises by the window's count of targets
    # (num_items_in_batch), not by the number of micro-batches; both passes must use it.
    model, data = tiny_gpt2(), lm_data(3 * BATCH * ACCUM)
    ref, _ = reference(model, sam_factory, data)
    SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=sam_factory).train()
    assert_close(model, ref)


def test_bf16(tmp_path):
    model, data = tiny_bert(), cls_data(2 * BATCH * ACCUM)
    trainer = SAMTrainer(model=model, args=args(tmp_path, bf16=True, max_steps=2), train_dataset=data, sam=sam_factory)
    trainer.train()
    # The reference runs the same forward under bf16 autocast (Accelerate casts outputs back to float32).
    ref, _ = reference(tiny_bert(), sam_factory, data, steps=2, autocast=torch.bfloat16)
    assert_close(model, ref, rtol=1e-4, atol=1e-5)


def test_fp16_grad_scaler(tmp_path):
    # Accelerate makes a GradScaler only on GPUs; the scaler path is tested with a CPU GradScaler put
    # in its place. A finite power-of-two scale steps as the unscaled loop does, up to fp16 rounding.
    model, data = tiny_bert(), cls_data(2 * BATCH * ACCUM)
    ref, _ = reference(model, sam_factory, data, steps=2, autocast=torch.float16)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=2, fp16=True), train_dataset=data, sam=sam_factory)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.accelerator.native_amp = True  # what a GPU has: autocast to fp16 and unscale before clipping
    trainer.train()
    assert_close(model, ref, rtol=1e-4, atol=1e-5)  # fp16 forward: reductions in another order


def test_fp16_overflow_in_the_ascent_pass_skips_the_step(tmp_path):
    # An infinite scale makes pass 1's gradient non-finite: SAM must not perturb, and the Trainer's
    # scaler must skip the base step (weights and momentum untouched, no LR-scheduler step).
    model, data = tiny_bert(), cls_data(BATCH * ACCUM)
    before = copy.deepcopy(model)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, sam=sam_factory)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    trainer.train()
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.lr_scheduler.last_epoch == 0
    assert not trainer.sam_optimizer.base_optimizer.state  # no momentum buffer was made
    assert_close(model, before, rtol=0, atol=0)


def test_resume_equals_uninterrupted(tmp_path):
    # SSAM with a dynamic mask (drop/regrow every step, its own RNG) and AdamW: the checkpoint must
    # carry the masks, the step count and the mask source's state besides the Adam moments.
    def make(base):
        return SSAM(base, rho=0.1, mask=DynamicMask(0.5, 4, update_every=1, seed=5))

    data = cls_data(4 * BATCH * ACCUM)
    kw = {"max_steps": 4, "optim": "adamw_torch", "optim_args": None, "weight_decay": 0.1}
    full = tiny_bert()
    t_full = SAMTrainer(model=full, args=args(tmp_path / "full", **kw), train_dataset=data, sam=make)
    t_full.train()

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / "cut"
    SAMTrainer(
        model=tiny_bert(), args=args(out, **kw, save_strategy="steps", save_steps=2), train_dataset=data, sam=make
    ).train()
    ckpt = out / "checkpoint-2"
    assert (ckpt / SPARSAM_STATE_NAME).is_file()
    saved = torch.load(ckpt / SPARSAM_STATE_NAME, weights_only=True)
    assert saved["steps"] == 2 and saved["masks"]

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = tiny_bert(seed=7)  # other initial weights: everything must come from the checkpoint
    t_res = SAMTrainer(model=resumed, args=args(tmp_path / "res", **kw), train_dataset=data, sam=make)
    t_res.train(resume_from_checkpoint=str(ckpt))
    assert t_res.state.global_step == 4
    assert_close(resumed, full)
    a, b = t_res.sam_optimizer, t_full.sam_optimizer
    assert a._steps == b._steps == 4
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_peft_lora_ssam_on_adapters_only(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'sparsam[hf]')")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(tiny_gpt2(), cfg)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters non-trivial from step one
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 1000))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    data = lm_data(3 * BATCH * ACCUM)

    def make(base):
        return SSAM(base, rho=0.2, mask=RandomMask(0.5, seed=11))

    ref, ref_sam = reference(model, make, data)
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=make)
    trainer.train()
    assert_close(model, ref)
    sam = trainer.sam_optimizer
    assert {id(p) for g in sam.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in adapters
    }
    assert sam.masks and all("lora_" in n for n in sam.masks)
    assert all(torch.equal(sam.masks[k], ref_sam.masks[k]) for k in sam.masks)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    names = sam.param_names()
    assert sam._backup and all(names[p] in adapters for p in sam._backup)  # w is copied for adapters only


def test_sam_optimizer_passed_to_the_trainer(tmp_path):
    # optimizers=(SAM(...), None): the Trainer steps (and schedules) SAM's base optimizer.
    model, data = tiny_bert(), cls_data(3 * BATCH * ACCUM)
    ref, _ = reference(model, sam_factory, data)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, optimizers=(sam, None))
    trainer.train()
    assert trainer.sam_optimizer is sam
    assert_close(model, ref)


def test_bad_input(tmp_path):
    model, data = tiny_bert(), cls_data(BATCH * ACCUM)
    with pytest.raises(TypeError, match="must return a sparsam SAM"):
        SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=lambda base: base).train()
    with pytest.raises(TypeError, match="must wrap the optimizer it is given"):
        SAMTrainer(
            model=model,
            args=args(tmp_path),
            train_dataset=data,
            sam=lambda base: SAM(model.parameters(), torch.optim.SGD, lr=0.1),
        ).train()
    with pytest.raises(ValueError, match="max_grad_norm"):
        SAMTrainer(
            model=model, args=args(tmp_path), train_dataset=data, sam=lambda base: SAM(base, max_grad_norm=1.0)
        ).train()
    with pytest.raises(TypeError, match="sam must be a function"):
        SAMTrainer(model=model, args=args(tmp_path), train_dataset=data, sam=0.1)


def _ddp_worker(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    data = cls_data(4 * BATCH * ACCUM * world)
    result = {}
    for name, rho in (("plain", None), ("rho0", 0.0), ("sam", 0.1)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        model = tiny_bert()
        kw = {"model": model, "args": args(f"{out}/{name}", max_steps=4), "train_dataset": data}
        trainer = transformers.Trainer(**kw) if rho is None else SAMTrainer(**kw, rho=rho)
        trainer.train()
        result[name] = [p.detach().clone() for p in model.parameters()]
        result[f"{name}-ddp"] = trainer.accelerator.num_processes == world and isinstance(
            trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel
        )
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    # Two CPU processes (gloo): the Trainer wraps the model in DDP. With rho = 0 SAMTrainer must give
    # the plain Trainer's weights (pass 2 is all-reduced once per window, the loss normalised as the
    # Trainer does across ranks); with rho > 0 every rank must end with the same weights.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_ddp_worker, 2, port, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in ("plain", "rho0", "sam"):
        assert r0[f"{name}-ddp"] and r1[f"{name}-ddp"]  # the Trainer really ran under DDP
        for p, q in zip(r0[name], r1[name]):
            assert torch.equal(p, q), name
    for p, q in zip(r0["rho0"], r0["plain"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(r0["sam"], r0["plain"]))


def _fsdp2_worker(rank, world, port, out):
    rank_env(rank, world, port)
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    data = cls_data(3 * BATCH * ACCUM)
    result = {}
    for name, make in (("sam", sam_factory), ("ssam", ssam_factory)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        # Each rank reads BATCH / 2 samples per micro-batch: a window is the reference's 8 samples.
        # average_tokens_across_devices=False: else the Trainer multiplies BERT's mean loss by the
        # number of processes (it takes a model with loss kwargs for one normalising by token count).
        a = args(
            f"{out}/{name}",
            per_device_train_batch_size=BATCH // 2,
            average_tokens_across_devices=False,
            fsdp=True,
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
        )
        trainer = SAMTrainer(model=tiny_bert(), args=a, train_dataset=data, sam=make)
        # Accelerate turns its FSDP plugin on for accelerators only (on the CPU it runs DDP): switch
        # its FSDP2 path on by hand, so that the Trainer's prepare() shards the model as on GPUs.
        state = trainer.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**a.fsdp_plugin_args)
        trainer.is_fsdp_enabled = True
        trainer.train()
        params = list(trainer.model.parameters())
        result[name] = [p.full_tensor().detach() for p in params]
        result[f"{name}-sharded"] = all(type(p).__name__ == "DTensor" for p in params)
    torch.save(result, f"{out}/fsdp2-{rank}.pt")


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path):
    """The Trainer's FSDP2 path (fsdp_config={"version": 2}) on 2 CPU processes: SAM and SSAM
    (random masks, chosen per shard) give the weights of the two-pass loop on the global batch."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_fsdp2_worker, 2, port, str(tmp_path))
    data = cls_data(3 * BATCH * ACCUM)
    ranks = [torch.load(tmp_path / f"fsdp2-{r}.pt") for r in range(2)]
    for name, make in (("sam", sam_factory), ("ssam", ssam_factory)):
        ref, _ = reference(tiny_bert(), make, data)
        for got in ranks:
            assert got[f"{name}-sharded"]
            for (k, q), p in zip(ref.named_parameters(), got[name], strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_sharding_the_trainer_cannot_run_is_refused_with_the_reason(tmp_path):
    """DeepSpeed, FSDP1, and checkpoints under FSDP2 (the plugin is set by hand: one CPU process)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    a = args(tmp_path, save_strategy="steps")
    t = SAMTrainer(model=tiny_bert(), args=a, train_dataset=cls_data(8))
    t.is_deepspeed_enabled = True
    with pytest.raises(RuntimeError, match="DeepSpeed: its engine takes the optimizer step"):
        t.create_optimizer()
    t.is_deepspeed_enabled, t.is_fsdp_enabled = False, True
    t.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    with pytest.raises(RuntimeError, match="fsdp_version=1: FSDP1 hands the optimizer .* flattened parameters"):
        t.create_optimizer()
    t.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    with pytest.raises(ValueError, match=r"FSDP2 cannot write checkpoints.*save_strategy='steps'"):
        t.create_optimizer()
    assert t.sam_optimizer is None  # nothing was built
