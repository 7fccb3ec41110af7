"""ASAM's official parameter rule as SAM parameter groups.

The official ASAM code (Kwon et al., ICML 2021; github.com/SamsungLabs/ASAM, ``asam.py``) scales
the ascent gradient by ``T = |w| + eta`` only for parameters whose name contains ``"weight"``
(conv and linear weights, and the scales of normalisation layers, which PyTorch also calls
``weight``); every other parameter (biases, ...) gets the plain SAM ascent, ``T = 1``. One norm is
taken over all of them together:

```text
e_i = rho · T_i² g_i / ‖T g‖₂        T_i = |w_i| + eta for "weight" parameters, 1 otherwise
```

[`SAM`][sparsam.SAM] with ``adaptive=True`` scales *every* parameter (biases too). Since
``adaptive`` and ``eta`` are per parameter group and the norm runs over every group, the official
rule is two groups: ``asam_param_groups`` builds them.

```python
import torch
from sparsam import SAM
from sparsam.optim.asam import asam_param_groups

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
opt = SAM(asam_param_groups(model, eta=0.0), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
print([g["adaptive"] for g in opt.param_groups])  # [True, False]
```

Defaults of the official code: ``rho = 0.5`` (CIFAR-10) and ``1.0`` (CIFAR-100) in its README;
``eta`` is 0.01 in the ``ASAM`` class's signature but ``--eta`` defaults to 0.0 in
``example_cifar.py``, the script behind the README's commands. The official code adds ``1e-16`` to
the norm, [`SAM`][sparsam.SAM] adds its ``eps`` (default ``1e-12``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

RULES = ("all", "weight-names")
"""The values of [`asam_param_groups`][sparsam.optim.asam.asam_param_groups]'s ``rule``:
``"all"`` (every parameter, as ``adaptive=True``) or ``"weight-names"`` (the official code's rule)."""


def asam_param_groups(model: nn.Module, *, rule: str = "weight-names", **group_options: Any) -> list[dict[str, Any]]:
    """Parameter groups for ASAM: ``adaptive=True`` for the parameters the rule scales.

    Args:
        model: the network; its ``named_parameters()`` are split (all of them, in model order
            inside each group).
        rule: ``"weight-names"`` (the official code: a parameter is scaled when ``"weight"`` is in
            its name) or ``"all"`` (every parameter scaled, as ``SAM(adaptive=True)``: one group).
        **group_options: further options put in every group (``eta=``, ``rho=``,
            ``weight_decay=``, ...).

    Returns:
        A list of parameter-group dicts for [`SAM`][sparsam.SAM] or [`SSAM`][sparsam.SSAM]
        (empty groups are left out).

    Raises:
        ValueError: an unknown ``rule``, or ``adaptive`` given in ``group_options``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if "adaptive" in group_options:
        raise ValueError(f"adaptive is set by the rule, not given (got adaptive={group_options['adaptive']!r})")
    named = list(model.named_parameters())
    if rule == "all":
        scaled, plain = [p for _, p in named], []
    else:
        scaled = [p for n, p in named if "weight" in n]
        plain = [p for n, p in named if "weight" not in n]
    groups = [
        {"params": scaled, "adaptive": True, **group_options},
        {"params": plain, "adaptive": False, **group_options},
    ]
    return [g for g in groups if g["params"]]


__all__ = ["RULES", "asam_param_groups"]
