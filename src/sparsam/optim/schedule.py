"""SAM sparse in time and in samples: which steps perturb, with which ρ, from which samples.

* **Sparse in time** ([`SAMSchedule`][sparsam.optim.schedule.SAMSchedule]): the ascent runs on
  every ``every``-th step (Composer's SAM ``interval``), only from a ``start`` fraction of training
  on ("late-phase SAM": SAM only in the last ``1 - start`` of the steps), with ρ ramped linearly
  from ρ/R to ρ over the first R = ``ramp`` · total steps of the SAM phase. A step without ascent
  calls the closure once and the base optimizer steps: SGD's cost.
* **Sparse in samples** (``ascent_fraction``): the ascent gradient comes from the first
  ``ceil(f · n)`` samples of the batch (the closure reads
  [`batch_fraction`][sparsam.SAM.batch_fraction]), so pass 1 costs the fraction f. This is the
  m-sharpness of the SAM paper (Foret et al., ICLR 2021, Section 4.1: smaller ascent batches
  generalise at least as well). Under DDP with ``ascent="local"`` each rank perturbs with the
  gradient of its own first f of its batch.

[`ScheduledSAM`][sparsam.optim.schedule.ScheduledSAM] and
[`ScheduledSSAM`][sparsam.optim.schedule.ScheduledSSAM] carry both; LookSAM and ESAM are built on
them, so every variant composes with the schedule, the sub-batch ascent and SSAM's masks. The step
counter is in the optimizer's ``state_dict`` (an interrupted run resumes on the same schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from .._checks import check_settings
from .sam import ASCENT, SAM, PassKind
from .ssam import SSAM


def _fraction(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (v > 0.0 if low_open else v >= 0.0) and (v < 1.0 if high_open else v <= 1.0)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}0, 1{hi}, got {value!r}")
    return float(value)


class SAMSchedule:
    """Which optimizer steps run SAM's ascent, and the factor on ρ at each.

    Args:
        every: ascent on every ``every``-th step of the SAM phase (1: every step).
        start: fraction of the training steps before the SAM phase begins (0: from the first
            step; 0.75: SAM in the last quarter only). Needs ``total_steps`` when > 0.
        ramp: ρ grows linearly over this fraction of the training steps, counted from the start
            of the SAM phase: factor ``min(1, (t - t₀ + 1) / R)`` at step t with R = round(ramp · total).
            Needs ``total_steps`` when > 0.
        total_steps: the run's number of optimizer steps.

    Step t (0-based) runs the ascent when ``t ≥ t₀ = round(start · total_steps)`` and
    ``(t - t₀) % every == 0``.
    """

    def __init__(
        self, *, every: int = 1, start: float = 0.0, ramp: float = 0.0, total_steps: int | None = None
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (ascent on every k-th step), got {every!r}")
        start = _fraction("start", start, high_open=True)
        ramp = _fraction("ramp", ramp)
        if (start > 0 or ramp > 0) and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                f"start={start} / ramp={ramp} are fractions of training: they need total_steps (an int >= 1), "
                f"got total_steps={total_steps!r}"
            )
        self.every, self.start, self.ramp, self.total_steps = every, start, ramp, total_steps
        self.start_step = round(start * total_steps) if total_steps else 0
        self.ramp_steps = round(ramp * total_steps) if total_steps else 0

    @property
    def trivial(self) -> bool:
        """Every step runs the ascent with the full ρ (plain SAM)."""
        return self.every == 1 and self.start_step == 0 and self.ramp_steps <= 1

    def in_sam_phase(self, t: int) -> bool:
        return t >= self.start_step

    def ascent_at(self, t: int) -> bool:
        """Does step ``t`` (0-based) run the ascent?"""
        return t >= self.start_step and (t - self.start_step) % self.every == 0

    def rho_factor(self, t: int) -> float:
        """The factor on ρ at step ``t`` (1.0 outside the ramp)."""
        if self.ramp_steps <= 1:
            return 1.0
        return min(1.0, (t - self.start_step + 1) / self.ramp_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "start": self.start, "ramp": self.ramp, "total_steps": self.total_steps}

    def __repr__(self) -> str:
        return f"SAMSchedule(every={self.every}, start={self.start}, ramp={self.ramp}, total_steps={self.total_steps})"


class ScheduledSAM(SAM):
    """SAM (or, as a base class, any SAM variant) on a [`SAMSchedule`][sparsam.optim.schedule.SAMSchedule]
    and with the ascent from part of the batch.

    [`step`][sparsam.SAM.step] runs, at step t:

        not t's turn (schedule):  closure once at w (current_pass None) → base step       1 pass
        t's turn:                 SAM step with ρ · rho_factor(t), pass 1 on the first
                                  ceil(ascent_fraction · n) samples                        1 + f passes

    With ``every=1, start=0, ramp=0, ascent_fraction=1`` it is SAM, bitwise. The schedule acts in
    ``step``; the two-step API (``first_step`` / ``second_step``) is always a SAM step, with ρ
    unscaled. The step counter and [`compute`][sparsam.SAM.compute] are saved in ``state_dict``.

    Args:
        params_or_optimizer, base_optimizer_cls, **kwargs: as [`SAM`][sparsam.SAM] (or the next
            class in the method resolution order: [`SSAM`][sparsam.SSAM] for ``ScheduledSSAM``).
        every, start, ramp, total_steps: the [`SAMSchedule`][sparsam.optim.schedule.SAMSchedule].
        ascent_fraction: fraction of each batch that pass 1 uses, in (0, 1].

    ```python
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn
    from sparsam.optim.schedule import ScheduledSAM

    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    opt = ScheduledSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, every=2, ascent_fraction=0.25)

    def closure():
        n = math.ceil(opt.batch_fraction * len(x))  # 2 of 8 samples in pass 1
        loss = F.cross_entropy(net(x[:n]), y[:n])
        loss.backward()
        return loss

    for _ in range(4):  # steps 0 and 2 perturb, 1 and 3 are plain steps
        opt.zero_grad()
        opt.step(closure)
    print(opt.compute)  # 2 x (0.25 + 1) + 2 x 1 = 4.5
    ```
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[torch.optim.Optimizer] | None = None,
        *,
        every: int = 1,
        start: float = 0.0,
        ramp: float = 0.0,
        total_steps: int | None = None,
        ascent_fraction: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.schedule = SAMSchedule(every=every, start=start, ramp=ramp, total_steps=total_steps)
        self.ascent_fraction = _fraction("ascent_fraction", ascent_fraction, low_open=True)
        super().__init__(params_or_optimizer, base_optimizer_cls, **kwargs)
        self._t = 0  # steps taken through step(): the schedule's clock

    # ------------------------------------------------------------------ the contract
    @property
    def batch_fraction(self) -> float:
        return self.ascent_fraction if self.current_pass == ASCENT else 1.0

    def _pass_cost(self, kind: PassKind) -> float:
        return self.ascent_fraction if kind == ASCENT else 1.0

    @property
    def steps(self) -> int:
        """Steps taken through [`step`][sparsam.SAM.step] (the schedule's clock)."""
        return self._t

    def ascends_next(self) -> bool:
        """Does the next [`step`][sparsam.SAM.step] run the ascent (is it the schedule's turn)?"""
        return self.schedule.ascent_at(self._t)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> Any:
        if closure is None:
            return super().step(None)  # raises the TypeError that explains the closure
        t = self._t
        kwargs = {"grad_scaler": grad_scaler, "before_base_step": before_base_step, "base_step": base_step}
        if self.schedule.ascent_at(t):
            with self._rho_scaled(self.schedule.rho_factor(t)):
                loss = self._sam_step(closure, **kwargs)
        else:
            loss = self._plain_step(closure, **kwargs)
        self._t = t + 1
        return loss

    def _sam_step(self, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """A perturbing step (SAM's sequence; LookSAM and ESAM override it)."""
        return SAM.step(self, closure, **kwargs)

    @contextmanager
    def _rho_scaled(self, factor: float) -> Iterator[None]:
        """Every group's ρ times ``factor`` for the duration of one step (exactly restored)."""
        if factor == 1.0:
            yield
            return
        saved = [g["rho"] for g in self.param_groups]
        for g in self.param_groups:
            g["rho"] = g["rho"] * factor
        try:
            yield
        finally:
            for g, rho in zip(self.param_groups, saved):
                g["rho"] = rho

    # ------------------------------------------------------------------ checkpoints
    _STATE_KEYS: ClassVar[tuple[str, ...]] = ("schedule_step", "schedule", "ascent_fraction")

    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "schedule_step": self._t,
            "schedule": self.schedule.state_dict(),
            "ascent_fraction": self.ascent_fraction,
        }

    def _check_settings(self, extra: Mapping[str, Any]) -> None:
        super()._check_settings(extra)
        built = {**self.schedule.state_dict(), "ascent_fraction": self.ascent_fraction}
        saved = dict(extra["schedule"]) if isinstance(extra.get("schedule"), Mapping) else {}
        if "ascent_fraction" in extra:
            saved["ascent_fraction"] = extra["ascent_fraction"]
        check_settings(type(self).__name__, saved, built)  # LookSAM's k is the schedule's every

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._check_extra_state(extra)
        t = extra.get("schedule_step", 0)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"the state's schedule_step must be an int >= 0, got {t!r}")

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._t = int(extra.get("schedule_step", 0))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", schedule={self.schedule!r}, ascent_fraction={self.ascent_fraction})"


class ScheduledSSAM(ScheduledSAM, SSAM):
    """[`ScheduledSAM`][sparsam.optim.schedule.ScheduledSAM] with SSAM's masks: the schedule and
    the sub-batch ascent on top of [`SSAM`][sparsam.SSAM] (every SSAM argument is accepted).
    SSAM's mask clock counts perturbing steps; steps without ascent do not advance it."""


__all__ = ["SAMSchedule", "ScheduledSAM", "ScheduledSSAM"]
