"""What a method is, for the registry: the spec types, the build context, the settings a method
reads (a protocol [`TrainConfig`][sparsam.train.TrainConfig] satisfies) and the figure style."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer


class Settings(Protocol):
    """The settings the methods' builders and checks read: the fields of ``TrainConfig`` that
    belong to methods (mypy checks that ``TrainConfig`` has them all)."""

    opt: str
    base: str
    momentum: float
    batch_size: int
    seed: int
    clip: float | None
    rho: float
    adaptive: bool | None
    eta: float
    eps: float
    ascent: str
    sam_every: int
    sam_start: float
    rho_ramp: float
    ascent_fraction: float
    mask: str
    sparsity: float
    pattern: str
    granularity: str
    budget: str
    fill: str
    form: str
    norm: str
    sparse_ascent: bool | None
    implicit_layers: str
    mask_update_epochs: int
    mask_timing: str
    num_samples: int
    true_fisher: bool
    fisher_bn_stats: str
    dynamic_alpha: float
    drop: str
    grow: str
    dynamic_counts: str
    look_k: int
    look_alpha: float
    look_per_tensor: bool
    esam_beta: float
    esam_gamma: float

    def is_adaptive(self) -> bool: ...

    def nm_pair(self) -> tuple[int, int]: ...


@dataclass
class BuildContext:
    """What a builder may use: the config, the base optimizer and the engine's objects.

    ``model`` is what SAM/SSAM use for BatchNorm (clean-pass statistics), DDP ``no_sync`` and
    parameter names: the DDP wrapper when there is one, never the ``torch.compile`` wrapper.
    """

    cfg: Settings
    base: Optimizer
    model: nn.Module
    loss_fn: Any
    fisher_data: Any
    steps_per_epoch: int
    total_steps: int
    mask_builder: Callable[[BuildContext], Any] | None = None

    def sam_kwargs(self) -> dict[str, Any]:
        """The arguments every SAM-family optimizer takes from the config."""
        cfg = self.cfg
        return dict(
            rho=cfg.rho,
            adaptive=cfg.is_adaptive(),
            eta=cfg.eta,
            eps=cfg.eps,
            model=self.model,
            ascent=cfg.ascent,
            max_grad_norm=cfg.clip,
        )

    def mask(self) -> Any:
        """The mask source named by ``--mask``."""
        if self.mask_builder is None:
            raise TypeError(f"--opt {self.cfg.opt} takes no --mask")
        return self.mask_builder(self)


# ------------------------------------------------------------------------------------------ figure style
#: the families, in panel order; SGD and SAM are the references drawn in every panel
FAMILIES: tuple[str, ...] = ("SGD", "SAM", "SSAM-F", "SSAM-D", "other SSAM", "cheaper SAM", "other")
REFERENCES: frozenset[str] = frozenset({"SGD", "SAM"})


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn in every figure of the project.

    Attributes:
        color: its colour, ``#rrggbb``: SGD grey, SAM black, SSAM-F blues, SSAM-D oranges (sparsity
            as lightness), other masks raspberry and magenta, cheaper SAM variants greens, purples,
            teal and gold-olive (MSAM).
        label: the method in words: ``"SGD"``, ``"SSAM-F, 50%"``, ``"SAM every 2 steps"``, ...
        family: one of ``FAMILIES``: ``"SGD"``, ``"SAM"`` (the references), ``"SSAM-F"``,
            ``"SSAM-D"``, ``"other SSAM"``, ``"cheaper SAM"``, ``"other"``; a figure's panel.
        marker: a matplotlib marker.
        linestyle: a matplotlib line style.
    """

    color: str
    label: str
    family: str
    marker: str = "o"
    linestyle: str = "-"

    @property
    def reference(self) -> bool:
        """SGD and SAM (and ASAM): drawn in every panel as the references."""
        return self.family in REFERENCES


def hex_color(hue_deg: float, lightness: float, saturation: float = 0.7) -> str:
    r, g, b = colorsys.hls_to_rgb((hue_deg % 360) / 360, min(max(lightness, 0.0), 1.0), saturation)
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (r, g, b)))


def num(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def is_scheduled(values: Any) -> bool:
    """Is a time schedule or a sub-batch ascent asked for (``--sam-every`` > 1, ``--sam-start`` > 0,
    ``--rho-ramp`` > 0 or ``--ascent-fraction`` < 1)?"""
    get = values.get if isinstance(values, Mapping) else lambda k, d=None: getattr(values, k, d)
    return (
        get("sam_every", 1) != 1
        or get("sam_start", 0.0) != 0.0
        or get("rho_ramp", 0.0) != 0.0
        or get("ascent_fraction", 1.0) != 1.0
    )


def schedule_style(s: Mapping[str, Any], base: str) -> tuple[str, float, float, str]:
    """(label, hue, lightness, marker) of a time schedule / sub-batch ascent on top of ``base``."""
    every = int(num(s.get("sam_every"), 1))
    start = num(s.get("sam_start"), 0.0)
    ramp = num(s.get("rho_ramp"), 0.0)
    asc = num(s.get("ascent_fraction"), 1.0)
    plain = "," not in base
    label = base
    if every != 1:
        label += f" every {every} steps" if plain else f", every {every} steps"
    if start:
        if label == "SAM":
            label = f"late-phase SAM (last {pct(1 - start)})"
        else:
            label += f", late phase (last {pct(1 - start)})"
    if ramp:
        label += f", ρ ramped over {pct(ramp)}"
    if asc != 1:
        label += f", ascent on {pct(asc)} of the batch"
    if every != 1:  # greens: every-k dark (lighter for larger k), late phase sea green, sub-batch yellow-green
        return label, 125.0, min(0.28 + 0.07 * math.log2(max(every, 2) / 2), 0.6), "v"
    if start:
        return label, 155.0, 0.42, "<"
    if asc != 1:
        return label, 85.0, 0.5, ">"
    return label, 105.0, 0.36, "p"


def with_schedule(s: Mapping[str, Any], label: str) -> str:
    """``label`` with the words of a time schedule / sub-batch ascent, if any."""
    return schedule_style(s, label)[0] if is_scheduled(s) else label


# ------------------------------------------------------------------------------------------ the specs
Style = Callable[[Mapping[str, Any], "MaskSpec | None"], MethodStyle]


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--opt`` value.

    Attributes:
        name: the ``--opt`` value (and the method name when ``uses_mask`` is False).
        label: the report's name for it.
        help: a few words for ``--help``.
        build: returns the optimizer to step; ``None`` means the base optimizer itself (plain SGD/AdamW).
        style: its figure style, from a run's settings (and its mask's spec when it takes one).
        owns: config keys that only matter for this optimizer (the report ignores them for other methods).
        uses_mask: the optimizer takes a mask source (``--mask``); its methods are ``<name>-<mask short>``.
        adaptive: ``--adaptive`` defaults to on.
        fsdp: it runs under ``--fsdp`` (FSDP2-sharded parameters; tested there).
        check: cross-field validation of a config with this optimizer (raise ConfigError).
        fsdp_check: what it refuses under ``--fsdp`` beyond the shared rules (raise ConfigError).
    """

    name: str
    label: str
    help: str
    build: Callable[[BuildContext], Optimizer] | None
    style: Style
    owns: frozenset[str] = frozenset()
    uses_mask: bool = False
    adaptive: bool = False
    fsdp: bool = False
    check: Callable[[Settings], None] | None = None
    fsdp_check: Callable[[Settings], None] | None = None


@dataclass(frozen=True)
class MaskSpec:
    """One ``--mask`` value (an SSAM mask source).

    Attributes:
        name: the ``--mask`` value.
        short: the method-name suffix (``ssam-<short>``); unique.
        label: the report's suffix (``SSAM-<label>``).
        help: a few words for ``--help``.
        build: returns the mask source.
        hue: its hue in figures (degrees; sparsity is the lightness).
        family: its figure panel (one of ``FAMILIES``).
        words: the mask in words where its letter says too little (``"norm layers only"``): the
            figure's label, and the table's after the letter. ``""``: the letter and the sparsity.
        owns: config keys that only matter for this mask source.
        sparse: the mask depends on ``--sparsity`` (sweeps vary it, run names show it).
        fsdp: it runs under ``--fsdp`` (tested on sharded parameters).
        check: cross-field validation of a config with this mask (raise ConfigError).
        fsdp_check: what it refuses under ``--fsdp`` beyond the shared rules (raise ConfigError).
    """

    name: str
    short: str
    label: str
    help: str
    build: Callable[[BuildContext], Any]
    hue: float = 240.0
    family: str = "other SSAM"
    words: str = ""
    owns: frozenset[str] = frozenset()
    sparse: bool = True
    fsdp: bool = False
    check: Callable[[Settings], None] | None = None
    fsdp_check: Callable[[Settings], None] | None = None
