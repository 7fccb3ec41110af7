"""The training configuration: one dataclass, its validation, and the layering
defaults < preset < config file < command-line flags.

Every field of [`TrainConfig`][sparsam.train.TrainConfig] is also a command-line flag (``batch_size`` ->
``--batch-size``); the parser is built from the dataclass, so a new option is one field here. Fields
marked ``identity=False`` are *run control* (where to write, progress bar, how often to log, ...): they
may change when a run is resumed; every other field must match the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import list_models
from . import methods
from .errors import ConfigError

DATA_NAMES = ("digits", "cifar10", "cifar100")
OPTIMIZERS = tuple(methods.OPTIMIZERS)
MASKS = tuple(methods.MASKS)
#: ``--opt`` also takes a method name that names a mask: ``--opt ssam-f`` = ``--opt ssam --mask fisher``
OPT_ALIASES: dict[str, dict[str, Any]] = {n: v for n, v in methods.METHODS.items() if n not in methods.OPTIMIZERS}


def _f(
    default: Any,
    help: str,
    *,
    group: str,
    choices: Sequence[str] | None = None,
    identity: bool = True,
    metavar: str | None = None,
    nargs: int | None = None,
) -> Any:
    meta = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices else None,
        "identity": identity,
        "metavar": metavar,
        "nargs": nargs,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that defines a training run. The Training guide documents each option."""

    # ---------------------------------------------------------------- data
    data: str = _f(
        "digits",
        "data set: digits (built in, no download), cifar10, cifar100, or an image-folder "
        "directory in the ImageNet layout (DIR/train/CLASS/*.jpg, DIR/test|val/CLASS/*.jpg)",
        group="data",
    )
    data_root: str | None = _f(
        None, "folder holding the CIFAR files (default $SPARSAM_DATA, else ./data)", group="data", identity=False
    )
    download: bool = _f(False, "download CIFAR (MD5-checked) if its files are missing", group="data", identity=False)
    train_subset: int | None = _f(
        None, "train on a seeded subset of N training images (CPU-scale studies)", group="data", metavar="N"
    )
    test_subset: int | None = _f(None, "evaluate on a fixed subset of N test images", group="data", metavar="N")
    subset: str = _f(
        "balanced",
        "how subsets are drawn: the same number per class, or uniformly at random",
        group="data",
        choices=("balanced", "random"),
    )
    subset_seed: int = _f(
        0, "seed of the subsets (independent of --seed, so every run sees the same images)", group="data"
    )
    label_noise: float = _f(
        0.0,
        "symmetric label noise: give exactly round(FRACTION x N) training labels a "
        "different class drawn uniformly (seeded by --subset-seed; the test set stays clean)",
        group="data",
        metavar="FRACTION",
    )
    augment: str = _f(
        "auto",
        "training augmentation: auto = cifar for CIFAR, crop-flip for image folders, none "
        "for digits; cifar = random crop + flip + Cutout",
        group="data",
        choices=("auto", "none", "flip", "crop-flip", "cifar"),
    )
    crop_padding: int = _f(4, "random-crop padding in pixels", group="data")
    crop_fill: str = _f(
        "mean",
        "colour of the random crop's padding: the data set's mean colour, or black (torchvision's "
        "RandomCrop on the raw image, as the SSAM authors)",
        group="data",
        choices=("mean", "black"),
    )
    cutout: int = _f(16, "Cutout square side in pixels (0: off)", group="data")
    cutout_p: float = _f(0.5, "probability of Cutout per image", group="data")
    folder_mode: str = _f(
        "auto",
        "image folders: memory = decode once and keep on the device (small images), "
        "stream = decode in DataLoader workers every epoch (large images, e.g. ImageNet); "
        "auto picks by the first image's size (<= 64 px: memory)",
        group="data",
        choices=("auto", "memory", "stream"),
    )
    image_size: int = _f(224, "crop size for streamed image folders (random-resized crop / centre crop)", group="data")
    workers: int = _f(4, "DataLoader worker processes for decoding image folders", group="data", identity=False)
    skip_damaged: bool = _f(
        False,
        "image folders: leave out image files that cannot be decoded (truncated, "
        "corrupted), with a warning that counts them; without it the first one is an error "
        "naming the file",
        group="data",
    )

    # ---------------------------------------------------------------- model
    model: str = _f(
        "smallcnn",
        f"architecture from sparsam.models ({', '.join(list_models())}, any wrn{{depth}}-{{k}})",
        group="model",
    )
    width: int | None = _f(None, "base width of the model (default: the published one)", group="model")

    # ---------------------------------------------------------------- optimizer
    opt: str = _f(
        "sgd",
        "optimizer: "
        + ", ".join(o.help for o in methods.OPTIMIZERS.values())
        + "; or a method name with its mask: "
        + ", ".join(n for n in OPT_ALIASES if n.startswith("ssam-"))
        + ", ... (ssam-f = --opt ssam --mask fisher)",
        group="optimizer",
        choices=OPTIMIZERS,
        metavar="NAME",
    )
    base: str = _f("sgd", "base optimizer that takes the descent step", group="optimizer", choices=("sgd", "adamw"))
    lr: float = _f(0.05, "peak learning rate", group="optimizer")
    momentum: float = _f(0.9, "SGD momentum", group="optimizer")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)", group="optimizer")
    weight_decay: float = _f(5e-4, "weight decay (L2 for SGD, decoupled for AdamW)", group="optimizer")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", group="optimizer", metavar="B", nargs=2)
    rho: float = _f(0.05, "SAM neighbourhood radius", group="optimizer")
    adaptive: bool | None = _f(
        None,
        "ASAM's adaptive perturbation (default: on for --opt "
        + ", ".join(n for n, o in methods.OPTIMIZERS.items() if o.adaptive)
        + " only)",
        group="optimizer",
    )
    eta: float = _f(0.01, "ASAM offset: T = |w| + eta", group="optimizer")
    asam_rule: str = _f(
        "all",
        "which parameters ASAM scales by |w| + eta: all, or those whose name contains "
        "'weight' (the official ASAM code; biases get the plain SAM ascent)",
        group="optimizer",
        choices=("all", "weight-names"),
    )
    eps: float = _f(
        1e-12,
        "added to the gradient norm in the perturbation rho g / (||g|| + eps) (the SSAM authors' code: 1e-7)",
        group="optimizer",
    )
    ascent: str = _f(
        "local",
        "data parallel: each rank perturbs with its own gradient (local, SAM's m-sharpness) "
        "or with the all-reduced one (sync; the default, and the only one, under --fsdp)",
        group="optimizer",
        choices=("local", "sync"),
    )

    # ---------------------------------------------------------------- SSAM
    sparsity: float = _f(0.5, "SSAM: fraction of coordinates NOT perturbed", group="ssam")
    mask: str = _f(
        "fisher", "SSAM mask source: " + ", ".join(m.help for m in methods.MASKS.values()), group="ssam", choices=MASKS
    )
    pattern: str = _f("unstructured", "mask pattern", group="ssam", choices=("unstructured", "structured", "nm"))
    granularity: str = _f(
        "tensor",
        "structured pattern unit: whole tensors or output channels",
        group="ssam",
        choices=("tensor", "channel"),
    )
    nm: str = _f("2:4", "N:M pattern (with --pattern nm): keep N of every M weights", group="ssam", metavar="N:M")
    budget: str = _f(
        "global", "one budget over all parameters, or one per layer", group="ssam", choices=("global", "layer")
    )
    form: str = _f(
        "explicit",
        "explicit: mask the perturbation; implicit: dense perturbation, masked input gradients in the ascent backward",
        group="ssam",
        choices=("explicit", "implicit"),
    )
    norm: str = _f(
        "full",
        "perturbation norm: full gradient (the authors') or masked gradient (||e|| = rho)",
        group="ssam",
        choices=("full", "masked"),
    )
    sparse_ascent: bool | None = _f(
        None,
        "skip weight gradients of unperturbed tensors in the ascent pass (default: on with --norm masked)",
        group="ssam",
    )
    num_samples: int = _f(128, "SSAM-F: Ns, samples of the Fisher information", group="ssam")
    mask_update_epochs: int = _f(1, "update the mask every this many epochs (0: never)", group="ssam")
    dynamic_alpha: float = _f(0.5, "SSAM-D: initial drop rate alpha of the cosine schedule", group="ssam")
    grow: str = _f(
        "random",
        "SSAM-D: grow at random, by largest |g| or by largest |w|",
        group="ssam",
        choices=("random", "gradient", "weight"),
    )
    drop: str = _f(
        "gradient",
        "SSAM-D: drop the smallest |g|, the smallest |w| or at random",
        group="ssam",
        choices=("gradient", "weight", "random"),
    )
    mask_timing: str = _f(
        "before-step",
        "when masks are made: before-step (first mask before step 0, new masks "
        "serve the step they are made at) or after-step (the authors': SSAM-F starts all-zero so "
        "only step 0 is unperturbed, each mask is made after the step and serves from the next)",
        group="ssam",
        choices=("before-step", "after-step"),
    )
    fill: str = _f(
        "first-fit",
        "structured pattern: meet the global budget first-fit (never exceeds it) or "
        "overshoot (the authors': whole tensors by decreasing mean until the budget is reached)",
        group="ssam",
        choices=("first-fit", "overshoot"),
    )
    implicit_layers: str = _f(
        "conv+linear",
        "implicit form: the layers whose input gradient is masked (conv = the authors' --samconv)",
        group="ssam",
        choices=("conv+linear", "conv", "linear"),
    )
    dynamic_counts: str = _f(
        "exact",
        "SSAM-D: exact keeps round((1 - s) N) perturbed coordinates at every update; nominal counts as the "
        "authors' code (N - ceil(N s) at first, then keeps int(L (1 - dr)) and grows int(min(L dr, N s)), "
        "L = N - N s, so the count can end one short)",
        group="ssam",
        choices=("exact", "nominal"),
    )
    fisher_augment: bool = _f(
        False,
        "SSAM-F: draw the Fisher samples from the augmented training images (the authors'), not the plain ones",
        group="ssam",
    )
    true_fisher: bool = _f(
        False, "SSAM-F: sample labels from the model (true Fisher) instead of the targets", group="ssam"
    )
    fisher_bn_stats: str = _f(
        "running", "SSAM-F: BatchNorm statistics of the per-sample passes", group="ssam", choices=("running", "sample")
    )

    # ---------------------------------------------------------------- cheaper SAM (docs/variants.md)
    sam_every: int = _f(
        1,
        "SAM's ascent on every K-th step only; the other steps run one pass (SGD's cost)",
        group="variants",
        metavar="K",
    )
    sam_start: float = _f(
        0.0,
        "SAM from this fraction of training on (late-phase SAM: 0.75 = the last quarter); before it, plain steps",
        group="variants",
        metavar="FRACTION",
    )
    rho_ramp: float = _f(
        0.0,
        "ramp rho linearly from rho/R to rho over R = FRACTION x training steps, from --sam-start on",
        group="variants",
        metavar="FRACTION",
    )
    ascent_fraction: float = _f(
        1.0,
        "the ascent gradient from the first FRACTION of each batch (pass 1 costs that fraction; SAM's m-sharpness)",
        group="variants",
        metavar="FRACTION",
    )
    look_k: int = _f(
        5, "LookSAM: a SAM step every K steps, the stored g_v reused in between", group="variants", metavar="K"
    )
    look_alpha: float = _f(0.7, "LookSAM: weight alpha of the reused component g_v", group="variants")
    look_per_tensor: bool = _f(
        False,
        "LookSAM: project and rescale g_v per parameter tensor (the public re-implementations' form; "
        "default: over all parameters at once, as the paper's algorithm)",
        group="variants",
    )
    esam_beta: float = _f(
        0.6, "ESAM: probability that a parameter tensor is perturbed at a step (SWP)", group="variants"
    )
    esam_gamma: float = _f(
        0.5,
        "ESAM: fraction of each batch whose loss rose most under the perturbation, used in pass 2 (SDS; 1 = off)",
        group="variants",
    )

    # ---------------------------------------------------------------- schedule
    epochs: int = _f(10, "training epochs", group="schedule")
    batch_size: int = _f(
        128,
        "batch size of a step: over all data-parallel ranks together (--batch-scope global) or per process "
        "(--batch-scope per-process); split into --accum micro-batches",
        group="schedule",
    )
    batch_scope: str = _f(
        "global",
        "what --batch-size counts under data parallelism: the whole step (global: each of W processes "
        "takes batch-size / W) or each process's batch (per-process, the SSAM authors' --batch_size: "
        "a step sees W x batch-size images)",
        group="schedule",
        choices=("global", "per-process"),
    )
    schedule: str = _f(
        "cosine",
        "learning-rate schedule: cosine (every optimizer step), cosine-epoch (the "
        "authors': once per epoch, epoch e at the cosine value of epoch max(e - 1, 0)) or constant",
        group="schedule",
        choices=("cosine", "cosine-epoch", "constant"),
    )
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (fractions allowed)", group="schedule")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine schedule", group="schedule")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss", group="schedule")

    # ---------------------------------------------------------------- engine
    amp: str = _f("none", "autocast dtype (fp16 uses a GradScaler)", group="engine", choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels-last memory format", group="engine")
    compile: bool = _f(False, "torch.compile the model", group="engine")
    fsdp: bool = _f(
        False,
        "under torchrun: shard the model with FSDP2 (fully_shard per top-level block and the "
        "root) instead of DDP; --opt sgd, sam, asam or ssam with --mask random, --ascent sync "
        "(its default here; docs/scaling.md)",
        group="engine",
        identity=False,
    )
    accum: int = _f(1, "gradient accumulation: micro-batches per step (in both SAM passes)", group="engine")
    clip: float | None = _f(None, "clip the descent gradient to this global L2 norm", group="engine")
    seed: int = _f(0, "random seed (model init, shuffling, augmentation, masks)", group="engine")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda if available)", group="engine", identity=False)
    threads: int | None = _f(
        None,
        "CPU threads for intra-op parallelism (default: PyTorch's choice; 1 is often fastest for tiny models)",
        group="engine",
        identity=False,
    )
    eval_batch_size: int = _f(500, "evaluation batch size per rank", group="engine", identity=False)
    test_epochs: str = _f(
        "all",
        "after which epochs to evaluate on the test set: all, or a comma list such as 5,10,15 "
        "(the last epoch is always evaluated; skipping the rest saves the evaluation's time)",
        group="run",
        identity=False,
        metavar="EPOCHS",
    )

    # ---------------------------------------------------------------- run control
    out: str | None = _f(
        None, "run directory (default runs/DATA-MODEL-METHOD-seedSEED)", group="run", identity=False, metavar="DIR"
    )
    progress: bool = _f(True, "progress bar (rank 0, only on a terminal)", group="run", identity=False)
    log_every: int = _f(
        20, "steps between progress-bar updates (each reads the loss: one host sync)", group="run", identity=False
    )
    tensorboard: bool = _f(
        False, "also log to TensorBoard (needs the tensorboard package)", group="run", identity=False
    )
    stop_after: int | None = _f(
        None,
        "stop with a checkpoint after this many epochs in this invocation "
        "(time-limited job slots; continue with --resume)",
        group="run",
        identity=False,
        metavar="EPOCHS",
    )

    # ---------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def method(self) -> str:
        """The method name (sgd, sam, asam, ssam-f, ...; see
        [`sparsam.train.methods.METHODS`][sparsam.train.METHODS])."""
        return methods.method_name(self)

    def nm_pair(self) -> tuple[int, int]:
        """(N, M) of ``--nm``, parsed as the mask selection parses patterns; ConfigError naming the value."""
        from ..masks.selection import parse_pattern

        try:
            kind, n, m = parse_pattern(self.nm)
        except (ValueError, TypeError) as e:
            if str(e).startswith("N:M needs"):
                raise _bad("nm", self.nm, "needs 1 <= N <= M") from None
            kind, n, m = "", None, None
        if kind != "nm" or n is None or m is None:
            raise _bad("nm", self.nm, "must look like N:M, e.g. 2:4")
        return n, m

    def is_adaptive(self) -> bool:
        return methods.OPTIMIZERS[self.opt].adaptive if self.adaptive is None else bool(self.adaptive)

    def default_out(self) -> str:
        data = self.data if self.data in DATA_NAMES else Path(self.data).name or "folder"
        tag = self.method + (f"-s{self.sparsity:g}" if methods.is_sparse(self) else "") + methods.variant_tag(self)
        return os.path.join("runs", f"{data}-{self.model}-{tag}-seed{self.seed}")


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(TrainConfig)}
IDENTITY_KEYS: tuple[str, ...] = tuple(n for n, f in FIELDS.items() if f.metadata["identity"])


def flag(name: str) -> str:
    """The command-line flag of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _value_types() -> dict[str, tuple[type, bool]]:
    """Each field's value type (bool, int, float, str or list, a list of floats) and whether it may be None,
    from the dataclass's resolved annotations."""
    out: dict[str, tuple[type, bool]] = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        base = args[0] if optional else hint
        out[name] = (typing.get_origin(base) or base, optional)
    return out


TYPES: dict[str, tuple[type, bool]] = _value_types()


# ------------------------------------------------------------------------------------------ coercion
def _coerce(name: str, value: Any, source: str) -> Any:
    """Check (and lightly convert) one value from a config file or JSON: right type, or ConfigError."""
    kind, optional = TYPES[name]
    where = f"{flag(name)} (key {name!r} in {source})" if source != "command line" else flag(name)
    if optional and value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    raise AssertionError(f"unhandled field type {kind} of {name}")  # a programming error, not user input


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown configuration key {key!r} in {source}{hint}"


def check_keys(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Coerce a mapping of config values; unknown keys are an error naming the key and the source."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in FIELDS:
            raise ConfigError(_unknown_key_message(key, source))
        out[k] = _coerce(k, value, source)
    alias = OPT_ALIASES.get(out.get("opt", ""))
    if alias is not None:
        if "mask" in out and out["mask"] != alias["mask"]:
            where = "the command line" if source == "command line" else source
            raise ConfigError(
                f"--opt {out['opt']} means --opt {alias['opt']} --mask {alias['mask']}, and {where} also sets "
                f"--mask {out['mask']}: give --opt {alias['opt']} --mask {out['mask']}, or drop --mask"
            )
        out.update(alias)
    return out


# ------------------------------------------------------------------------------------------ files
def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A flat JSON or TOML file of config keys (``{"lr": 0.1, "opt": "sam"}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
        elif p.suffix.lower() == ".json":
            data = json.loads(text.decode("utf-8"))
        else:
            raise ConfigError(f"--config {path}: unsupported file type {p.suffix or '(none)'!r}; use .json or .toml")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config {path} is not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table/object of settings, got {type(data).__name__}")
    return check_keys(data, str(path))


# ------------------------------------------------------------------------------------------ validation
def _bad(name: str, value: Any, requirement: str) -> ConfigError:
    return ConfigError(f"{flag(name)} {requirement}, got {value!r}")


def test_epochs(cfg: TrainConfig) -> frozenset[int] | None:
    """The epochs (1-based) after which the engine evaluates on the test set, from ``--test-epochs``:
    None for every epoch, else the listed ones and the last. A bad list raises
    [`ConfigError`][sparsam.train.ConfigError] naming it."""
    spec = cfg.test_epochs.strip()
    if spec == "all":
        return None
    try:
        listed = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise ConfigError(
            f"--test-epochs must be 'all' or a comma list of epochs such as 5,10,15, got {cfg.test_epochs!r}"
        ) from None
    bad = sorted(e for e in listed if not 1 <= e <= cfg.epochs)
    if bad:
        raise ConfigError(f"--test-epochs: epoch {bad[0]} is outside 1..{cfg.epochs} (--epochs {cfg.epochs})")
    return frozenset(listed | {cfg.epochs})


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value and cross-field rule; raise [`ConfigError`][sparsam.train.ConfigError] naming
    the flag and value. Returns ``cfg`` (with ``data`` made absolute when it is a folder)."""
    for name in FIELDS:
        _coerce(name, getattr(cfg, name), "command line")  # types (config files are checked on reading)
        choices = FIELDS[name].metadata["choices"]
        if choices and getattr(cfg, name) not in choices:
            known = (*choices, *OPT_ALIASES) if name == "opt" else choices
            close = difflib.get_close_matches(str(getattr(cfg, name)), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{flag(name)} must be one of {', '.join(known)}, got {getattr(cfg, name)!r}{hint}")

    def finite(name: str) -> float:
        v = getattr(cfg, name)
        if not math.isfinite(v):
            raise _bad(name, v, "must be a finite number")
        return v

    for name in ("lr",):
        if not finite(name) > 0:
            raise _bad(name, cfg.lr, "must be > 0")
    # rho, eta (SAM), betas (AdamW) and dynamic_alpha (DynamicMask) are checked by their constructors.
    if not finite("eps") >= 0:
        raise _bad("eps", cfg.eps, "must be >= 0")
    for name in ("weight_decay", "min_lr", "warmup_epochs"):
        if not finite(name) >= 0:
            raise _bad(name, getattr(cfg, name), "must be >= 0")
    if not 0 <= finite("momentum") < 1:
        raise _bad("momentum", cfg.momentum, "must be in [0, 1)")
    if not 0 <= finite("sparsity") < 1:
        raise _bad("sparsity", cfg.sparsity, "must be in [0, 1) (the fraction of coordinates NOT perturbed)")
    if not 0 <= finite("label_noise") < 1:
        raise _bad("label_noise", cfg.label_noise, "must be a fraction in [0, 1)")
    if not 0 <= finite("label_smoothing") < 1:
        raise _bad("label_smoothing", cfg.label_smoothing, "must be in [0, 1)")
    if not 0 <= finite("cutout_p") <= 1:
        raise _bad("cutout_p", cfg.cutout_p, "must be a probability in [0, 1]")
    if len(cfg.betas) != 2:
        raise _bad("betas", cfg.betas, "must be two numbers")
    if not 0 <= finite("sam_start") < 1:
        raise _bad("sam_start", cfg.sam_start, "must be a fraction in [0, 1)")
    for name in ("rho_ramp",):
        if not 0 <= finite(name) <= 1:
            raise _bad(name, getattr(cfg, name), "must be a fraction in [0, 1]")
    for name in ("ascent_fraction", "esam_beta", "esam_gamma"):
        if not 0 < finite(name) <= 1:
            raise _bad(name, getattr(cfg, name), "must be a fraction in (0, 1]")
    if not finite("look_alpha") >= 0:
        raise _bad("look_alpha", cfg.look_alpha, "must be >= 0")
    for name in (
        "epochs",
        "batch_size",
        "accum",
        "num_samples",
        "log_every",
        "eval_batch_size",
        "image_size",
        "sam_every",
        "look_k",
    ):
        if getattr(cfg, name) < 1:
            raise _bad(name, getattr(cfg, name), "must be >= 1")
    for name in ("crop_padding", "cutout", "mask_update_epochs", "seed", "subset_seed", "workers"):
        if getattr(cfg, name) < 0:
            raise _bad(name, getattr(cfg, name), "must be >= 0")
    test_epochs(cfg)  # raises on a bad --test-epochs list
    for name in ("train_subset", "test_subset", "width", "stop_after", "threads"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise _bad(name, v, "must be >= 1")
    if cfg.clip is not None and not (math.isfinite(cfg.clip) and cfg.clip > 0):
        raise _bad("clip", cfg.clip, "must be > 0")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs ({cfg.warmup_epochs:g}) must not exceed --epochs ({cfg.epochs})")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr ({cfg.min_lr:g}) must not exceed --lr ({cfg.lr:g})")
    if cfg.batch_size % cfg.accum:
        raise ConfigError(f"--batch-size ({cfg.batch_size}) must be divisible by --accum ({cfg.accum})")
    if cfg.nesterov and (cfg.base != "sgd" or cfg.momentum <= 0):
        raise ConfigError(
            f"--nesterov needs --base sgd and --momentum > 0, got --base {cfg.base} --momentum {cfg.momentum:g}"
        )
    cfg.nm_pair()
    methods.check(cfg)  # the optimizer's and the mask source's own rules
    if cfg.fsdp:
        _check_fsdp(cfg)
    key = cfg.data.strip()
    if key.lower() in DATA_NAMES:
        cfg.data = key.lower()
    elif os.path.isdir(key):
        cfg.data = os.path.abspath(key)
    else:
        hint = " (it looks like a path, but no such directory exists)" if os.sep in key or key.startswith(".") else ""
        raise ConfigError(
            f"--data {cfg.data!r} is neither a known data set ({', '.join(DATA_NAMES)}) nor an existing "
            f"image-folder directory{hint}"
        )
    return cfg


def _and(names: Iterable[str]) -> str:
    """``a, b and c``."""
    items = list(names)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _check_fsdp(cfg: TrainConfig) -> None:
    """What ``--fsdp`` supports (docs/scaling.md): the rest is refused by name."""
    # Which methods run sharded is the registry's (each enabled once tests/test_fsdp.py checked it).
    if not methods.OPTIMIZERS[cfg.opt].fsdp:
        raise ConfigError(
            f"--fsdp supports --opt {_and(n for n, o in methods.OPTIMIZERS.items() if o.fsdp)}, got --opt {cfg.opt} "
            "(use DDP: drop --fsdp)"
        )
    if methods.OPTIMIZERS[cfg.opt].uses_mask and not methods.MASKS[cfg.mask].fsdp:
        raise ConfigError(
            f"--fsdp with --opt {cfg.opt} supports --mask {_and(n for n, m in methods.MASKS.items() if m.fsdp)}, "
            f"got --mask {cfg.mask} (not tested on sharded parameters; use DDP)"
        )
    sam_family = cfg.opt != "sgd"
    if sam_family and cfg.ascent != "sync":
        raise ConfigError(
            f"--fsdp needs --ascent sync (its default), got --ascent {cfg.ascent}: FSDP reduce-scatters every "
            "gradient, so a rank only holds its shard of the averaged gradient and no per-rank ascent exists"
        )
    # --sam-every/--sam-start/--rho-ramp decide per step whether it perturbs (the same on every rank);
    # --ascent-fraction: every rank runs pass 1 on its first fraction, so FSDP's reduce-scatter pairs up.
    if cfg.compile:
        raise ConfigError("--fsdp with --compile is not supported (untested); drop one of them")
    if cfg.opt == "ssam" and cfg.mask == "dynamic" and cfg.dynamic_counts != "exact":
        raise ConfigError(
            f"--fsdp with --mask dynamic supports --dynamic-counts exact only, got --dynamic-counts {cfg.dynamic_counts}"
        )
    if cfg.opt == "ssam":
        if cfg.mask == "fisher" and cfg.pattern == "structured" and cfg.granularity == "tensor":
            raise ConfigError(
                "--fsdp with --mask fisher --pattern structured needs --granularity channel: a whole tensor's mean "
                "Fisher would be summed over the shards, whose rounding differs from one process's"
            )
        if cfg.form != "explicit":
            raise ConfigError(f"--fsdp supports --form explicit only, got --form {cfg.form}")
        if cfg.sparse_ascent or (cfg.sparse_ascent is None and cfg.norm == "masked"):
            raise ConfigError(
                "--fsdp cannot skip weight gradients in the ascent pass (--sparse-ascent, the default with --norm "
                "masked): a rank whose shard is unmasked would leave FSDP's reduce-scatter; pass --no-sparse-ascent"
            )


# ------------------------------------------------------------------------------------------ layering
def build_config(layers: Iterable[tuple[str, Mapping[str, Any]]]) -> TrainConfig:
    """Apply layers of values over the defaults, in order (later wins), and validate.
    Each layer is ``(source name, values)``; values are checked against the fields."""
    values: dict[str, Any] = {}
    for source, layer in layers:
        values.update(check_keys(layer, source))
    if values.get("fsdp") is True and "ascent" not in values:
        values["ascent"] = "sync"  # the only ascent FSDP has; an explicit --ascent local is still refused
    return validate(TrainConfig(**values))


def diff_identity(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """Identity keys whose values differ between a saved config and ``current``, as
    ``"--flag: saved X, now Y"`` lines (keys missing from ``saved`` take their defaults)."""
    defaults = TrainConfig()
    lines = []
    for key in IDENTITY_KEYS:
        old = saved.get(key, getattr(defaults, key))
        new = getattr(current, key)
        if isinstance(old, tuple):
            old = list(old)
        if old != new:
            lines.append(f"{flag(key)}: saved {old!r}, now {new!r}")
    return lines


# ------------------------------------------------------------------------------------------ argparse
def _parse_optional(kind: str, name: str) -> Any:
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind == 'int' else 'a number'} or 'none', got {text!r}"
            ) from None

    parse.__name__ = kind  # argparse names the type in its error message
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field. Defaults are suppressed, so the parsed namespace holds only the
    flags given on the command line (the top layer)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(f"{meta['group']} options")
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
        kind, optional = TYPES[name]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw.update(type=float, nargs=meta["nargs"], metavar=meta["metavar"])
        elif optional and kind in (int, float):
            kw.update(type=_parse_optional(kind.__name__, name), metavar=meta["metavar"] or kind.__name__.upper())
        else:
            kw["type"] = kind
            if meta["choices"]:
                kw["choices"] = (*meta["choices"], *OPT_ALIASES) if name == "opt" else meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        if name == "progress":  # --progress / --no-progress
            kw["help"] = meta["help"]
        group.add_argument(flag(name), **kw)


def cli_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line (the namespace holds only given flags)."""
    return {k: v for k, v in vars(namespace).items() if k in FIELDS}


__all__ = [
    "DATA_NAMES",
    "FIELDS",
    "IDENTITY_KEYS",
    "MASKS",
    "OPTIMIZERS",
    "OPT_ALIASES",
    "TrainConfig",
    "add_config_flags",
    "build_config",
    "check_keys",
    "cli_values",
    "diff_identity",
    "flag",
    "read_config_file",
    "validate",
]
