"""The training configuration: one dataclass, its validation, and the layering
defaults < preset < config file < command-line flags.

Every field of [`TrainConfig`][sparsam.train.TrainConfig] is also a command-line flag (``batch_size`` ->
``--batch-size``); the parser is built from the dataclass, so a new option is one field (a
``setting`` with its help, group, choices and range). The settings of a
method family live in its module of ``sparsam.train.methods`` (``SAMSettings``, ``SSAMSettings``,
``LookSAMSettings``, ``ESAMSettings``), which ``TrainConfig`` inherits; the fields here are those every
method shares. Fields marked ``identity=False`` are *run control* (where to write, progress bar, how
often to log, ...): they may change when a run is resumed; every other field must match the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.dataset import SUBSET_MODES
from ..data.sources import DATASET_NAMES
from ..models import list_models
from . import methods
from .errors import ConfigError
from .fields import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range, add_flags, bad, coerce, flag, setting
from .fields import check_values, ordered_fields, read_table, value_types
from .methods import ESAMSettings, LookSAMSettings, SAMSettings, SSAMSettings

DATA_NAMES = DATASET_NAMES
OPTIMIZERS = tuple(methods.OPTIMIZERS)
MASKS = tuple(methods.MASKS)
#: ``--opt`` also takes a method name that names a mask: ``--opt ssam-f`` = ``--opt ssam --mask fisher``
OPT_ALIASES: dict[str, dict[str, Any]] = {n: v for n, v in methods.METHODS.items() if n not in methods.OPTIMIZERS}


@dataclass
class TrainConfig(SAMSettings, SSAMSettings, LookSAMSettings, ESAMSettings):
    """Everything that defines a training run. The Training guide documents each option.

    One flat dataclass: the fields every method shares are declared here, a method family's own
    settings in its module (inherited: ``cfg.rho`` is ``SAMSettings.rho``)."""

    # ---------------------------------------------------------------- data
    data: str = setting(
        "digits",
        "data set: digits (built in, no download), cifar10, cifar100, or an image-folder "
        "directory in the ImageNet layout (DIR/train/CLASS/*.jpg, DIR/test|val/CLASS/*.jpg)",
        group="data",
    )
    data_root: str | None = setting(
        None, "folder holding the CIFAR files (default $SPARSAM_DATA, else ./data)", group="data", identity=False
    )
    download: bool = setting(
        False, "download CIFAR (MD5-checked) if its files are missing", group="data", identity=False
    )
    train_subset: int | None = setting(
        None,
        "train on a seeded subset of N training images (CPU-scale studies)",
        group="data",
        metavar="N",
        range=AT_LEAST_1,
    )
    test_subset: int | None = setting(
        None, "evaluate on a fixed subset of N test images", group="data", metavar="N", range=AT_LEAST_1
    )
    subset: str = setting(
        "balanced",
        "how subsets are drawn: the same number per class, or uniformly at random",
        group="data",
        choices=SUBSET_MODES,
    )
    subset_seed: int = setting(
        0,
        "seed of the subsets (independent of --seed, so every run sees the same images)",
        group="data",
        range=NON_NEGATIVE,
    )
    label_noise: float = setting(
        0.0,
        "symmetric label noise: give exactly round(FRACTION x N) training labels a "
        "different class drawn uniformly (seeded by --subset-seed; the test set stays clean)",
        group="data",
        metavar="FRACTION",
        range=Range(0, 1, hi_open=True, words="a fraction"),
    )
    augment: str = setting(
        "auto",
        "training augmentation: auto = cifar for CIFAR, crop-flip for image folders, none "
        "for digits; cifar = random crop + flip + Cutout",
        group="data",
        choices=("auto", "none", "flip", "crop-flip", "cifar"),
    )
    crop_padding: int = setting(4, "random-crop padding in pixels", group="data", range=NON_NEGATIVE)
    crop_fill: str = setting(
        "mean",
        "colour of the random crop's padding: the data set's mean colour, or black (torchvision's "
        "RandomCrop on the raw image, as the SSAM authors)",
        group="data",
        choices=("mean", "black"),
    )
    cutout: int = setting(16, "Cutout square side in pixels (0: off)", group="data", range=NON_NEGATIVE)
    cutout_p: float = setting(
        0.5, "probability of Cutout per image", group="data", range=Range(0, 1, words="a probability")
    )
    folder_mode: str = setting(
        "auto",
        "image folders: memory = decode once and keep on the device (small images), "
        "stream = decode in DataLoader workers every epoch (large images, e.g. ImageNet); "
        "auto picks by the first image's size (<= 64 px: memory)",
        group="data",
        choices=("auto", "memory", "stream"),
    )
    image_size: int = setting(
        224, "crop size for streamed image folders (random-resized crop / centre crop)", group="data", range=AT_LEAST_1
    )
    workers: int = setting(
        4, "DataLoader worker processes for decoding image folders", group="data", identity=False, range=NON_NEGATIVE
    )
    skip_damaged: bool = setting(
        False,
        "image folders: leave out image files that cannot be decoded (truncated, "
        "corrupted), with a warning that counts them; without it the first one is an error "
        "naming the file",
        group="data",
    )

    # ---------------------------------------------------------------- model
    model: str = setting(
        "smallcnn",
        f"architecture from sparsam.models ({', '.join(list_models())}, any wrn{{depth}}-{{k}})",
        group="model",
    )
    width: int | None = setting(
        None, "base width of the model (default: the published one)", group="model", range=AT_LEAST_1
    )

    # ---------------------------------------------------------------- optimizer
    opt: str = setting(
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
    base: str = setting(
        "sgd", "base optimizer that takes the descent step", group="optimizer", choices=("sgd", "adamw")
    )
    lr: float = setting(0.05, "peak learning rate", group="optimizer", range=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", group="optimizer", range=Range(0, 1, hi_open=True))
    nesterov: bool = setting(False, "Nesterov momentum (SGD)", group="optimizer")
    weight_decay: float = setting(
        5e-4, "weight decay (L2 for SGD, decoupled for AdamW)", group="optimizer", range=NON_NEGATIVE
    )
    betas: list[float] = setting([0.9, 0.999], "AdamW betas", group="optimizer", metavar="B", nargs=2)

    # ---------------------------------------------------------------- schedule
    epochs: int = setting(10, "training epochs", group="schedule", range=AT_LEAST_1)
    batch_size: int = setting(
        128,
        "batch size of a step: over all data-parallel ranks together (--batch-scope global) or per process "
        "(--batch-scope per-process); split into --accum micro-batches",
        group="schedule",
        range=AT_LEAST_1,
    )
    batch_scope: str = setting(
        "global",
        "what --batch-size counts under data parallelism: the whole step (global: each of W processes "
        "takes batch-size / W) or each process's batch (per-process, the SSAM authors' --batch_size: "
        "a step sees W x batch-size images)",
        group="schedule",
        choices=("global", "per-process"),
    )
    schedule: str = setting(
        "cosine",
        "learning-rate schedule: cosine (every optimizer step), cosine-epoch (the "
        "authors': once per epoch, epoch e at the cosine value of epoch max(e - 1, 0)) or constant",
        group="schedule",
        choices=("cosine", "cosine-epoch", "constant"),
    )
    warmup_epochs: float = setting(
        0.0, "linear warm-up length in epochs (fractions allowed)", group="schedule", range=NON_NEGATIVE
    )
    min_lr: float = setting(
        0.0, "learning rate at the end of the cosine schedule", group="schedule", range=NON_NEGATIVE
    )
    label_smoothing: float = setting(
        0.0, "label smoothing of the cross-entropy loss", group="schedule", range=Range(0, 1, hi_open=True)
    )

    # ---------------------------------------------------------------- engine
    amp: str = setting(
        "none", "autocast dtype (fp16 uses a GradScaler)", group="engine", choices=("none", "bf16", "fp16")
    )
    channels_last: bool = setting(False, "channels-last memory format", group="engine")
    compile: bool = setting(False, "torch.compile the model", group="engine")
    fsdp: bool = setting(
        False,
        "under torchrun: shard the model with FSDP2 (fully_shard per top-level block and the "
        "root) instead of DDP; --opt sgd, sam, asam or ssam with --mask random, --ascent sync "
        "(its default here; docs/scaling.md)",
        group="engine",
        identity=False,
    )
    accum: int = setting(
        1, "gradient accumulation: micro-batches per step (in both SAM passes)", group="engine", range=AT_LEAST_1
    )
    clip: float | None = setting(
        None, "clip the descent gradient to this global L2 norm", group="engine", range=POSITIVE
    )
    seed: int = setting(
        0, "random seed (model init, shuffling, augmentation, masks)", group="engine", range=NON_NEGATIVE
    )
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (cuda if available)", group="engine", identity=False)
    threads: int | None = setting(
        None,
        "CPU threads for intra-op parallelism (default: PyTorch's choice; 1 is often fastest for tiny models)",
        group="engine",
        identity=False,
        range=AT_LEAST_1,
    )
    eval_batch_size: int = setting(
        500, "evaluation batch size per rank", group="engine", identity=False, range=AT_LEAST_1
    )
    test_epochs: str = setting(
        "all",
        "after which epochs to evaluate on the test set: all, or a comma list such as 5,10,15 "
        "(the last epoch is always evaluated; skipping the rest saves the evaluation's time)",
        group="run",
        identity=False,
        metavar="EPOCHS",
    )

    # ---------------------------------------------------------------- run control
    out: str | None = setting(
        None, "run directory (default runs/DATA-MODEL-METHOD-seedSEED)", group="run", identity=False, metavar="DIR"
    )
    progress: bool = setting(True, "progress bar (rank 0, only on a terminal)", group="run", identity=False)
    log_every: int = setting(
        20,
        "steps between progress-bar updates (each reads the loss: one host sync)",
        group="run",
        identity=False,
        range=AT_LEAST_1,
    )
    tensorboard: bool = setting(
        False, "also log to TensorBoard (needs the tensorboard package)", group="run", identity=False
    )
    stop_after: int | None = setting(
        None,
        "stop with a checkpoint after this many epochs in this invocation "
        "(time-limited job slots; continue with --resume)",
        group="run",
        identity=False,
        metavar="EPOCHS",
        range=AT_LEAST_1,
    )

    # ---------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        """The values by key, in ``--help`` order (the order of a run's config.json)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in FIELDS}

    @property
    def method(self) -> str:
        """The method name (sgd, sam, asam, ssam-f, ...; see
        [`sparsam.train.methods.METHODS`][sparsam.train.METHODS])."""
        return methods.method_name(self)

    def is_adaptive(self) -> bool:
        return methods.OPTIMIZERS[self.opt].adaptive if self.adaptive is None else bool(self.adaptive)

    def default_out(self) -> str:
        data = self.data if self.data in DATA_NAMES else Path(self.data).name or "folder"
        tag = self.method + (f"-s{self.sparsity:g}" if methods.is_sparse(self) else "") + methods.variant_tag(self)
        return os.path.join("runs", f"{data}-{self.model}-{tag}-seed{self.seed}")


#: the fields by key, in ``--help`` order (by group; within one, the shared fields, then SAM's, SSAM's, ...)
FIELDS: dict[str, dataclasses.Field[Any]] = ordered_fields(TrainConfig)
IDENTITY_KEYS: tuple[str, ...] = tuple(n for n, f in FIELDS.items() if f.metadata["identity"])
TYPES: dict[str, tuple[type, bool]] = value_types(TrainConfig)


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
        out[k] = coerce(*TYPES[k], k, value, source)
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
    """A flat JSON or TOML file of config keys (``{"lr": 0.1, "opt": "sam"}``), checked."""
    return check_keys(read_table(path), str(path))


# ------------------------------------------------------------------------------------------ validation
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
    outside = sorted(e for e in listed if not 1 <= e <= cfg.epochs)
    if outside:
        raise ConfigError(f"--test-epochs: epoch {outside[0]} is outside 1..{cfg.epochs} (--epochs {cfg.epochs})")
    return frozenset(listed | {cfg.epochs})


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value and cross-field rule; raise [`ConfigError`][sparsam.train.ConfigError] naming
    the flag and value. Returns ``cfg`` (with ``data`` made absolute when it is a folder)."""
    check_values(cfg, FIELDS, TYPES, {"opt": tuple(OPT_ALIASES)})  # types, choices, then every declared range
    if len(cfg.betas) != 2:
        raise bad("betas", cfg.betas, "must be two numbers")
    test_epochs(cfg)  # raises on a bad --test-epochs list
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
    if cfg.fsdp and cfg.compile:
        raise ConfigError("--fsdp with --compile is not supported (untested); drop one of them")
    if cfg.fsdp:
        methods.check_fsdp(cfg)  # what --fsdp supports (docs/scaling.md): the rest is refused by name
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
def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped as ``--help`` shows them. Defaults are suppressed, so the
    parsed namespace holds only the flags given on the command line (the top layer)."""
    add_flags(parser, FIELDS, TYPES, TrainConfig(), {"opt": tuple(OPT_ALIASES)})


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
