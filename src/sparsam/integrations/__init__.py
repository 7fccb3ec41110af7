"""SAM and SSAM inside training frameworks.

Each framework has its own module, imported only when you use it, so ``import sparsam`` and
``import sparsam.integrations`` never import Lightning or Accelerate:

* ``sparsam.integrations.lightning``: [`SAMCallback`][sparsam.integrations.lightning.SAMCallback] for
  the PyTorch Lightning ``Trainer`` (``pip install "sparsam[lightning]"``).
* ``sparsam.integrations.accelerate``: [`SAMStep`][sparsam.integrations.accelerate.SAMStep] for
  Hugging Face Accelerate loops and the ``transformers`` ``Trainer``
  (``pip install "sparsam[accelerate]"``).

What goes wrong without them, and why, is in ``docs/frameworks.md``.
"""

from __future__ import annotations

from typing import Any

from ..optim.sam import SAM

__all__ = ["unwrap_optimizer"]

# Attribute under which each framework's optimizer wrapper keeps the wrapped optimizer:
# Accelerate's AcceleratedOptimizer (.optimizer), Lightning's LightningOptimizer (._optimizer).
_WRAPPER_ATTRS = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer: Any) -> SAM:
    """The [`SAM`][sparsam.SAM] (or [`SSAM`][sparsam.SSAM]) inside a framework's optimizer wrapper.

    ``accelerator.prepare`` returns an ``AcceleratedOptimizer`` and Lightning hands out a
    ``LightningOptimizer``; neither exposes ``first_step`` / ``second_step`` safely (the first has
    no such attribute, the second would run them against its own copy of the attributes). Call them
    on the object this returns. A SAM optimizer is returned as it is.

    Raises:
        TypeError: if no SAM optimizer is found inside ``optimizer``.
    """
    obj = optimizer
    for _ in range(8):  # wrappers of wrappers (Accelerate around DeepSpeed, ...): a few levels at most
        attrs = getattr(obj, "__dict__", {})
        inner = next((attrs[a] for a in _WRAPPER_ATTRS if a in attrs), None)
        if inner is None:
            break
        # A LightningOptimizer's class is a dynamic subclass of the wrapped optimizer's class, so
        # isinstance(wrapper, SAM) is true: unwrap by attribute, never by isinstance.
        obj = inner
    if not isinstance(obj, SAM):
        raise TypeError(f"no sparsam SAM/SSAM optimizer found inside {type(optimizer).__name__}")
    return obj
