"""SAM and SSAM inside training frameworks.

Each framework has its own module, imported only when you use it, so ``import sparsam`` and
``import sparsam.integrations`` never import Lightning or Accelerate:

* ``sparsam.integrations.lightning``: [`SAMCallback`][sparsam.integrations.lightning.SAMCallback] for
  the PyTorch Lightning ``Trainer`` (``pip install "sparsam[lightning]"``).
* ``sparsam.integrations.accelerate``: [`SAMStep`][sparsam.integrations.accelerate.SAMStep] for
  Hugging Face Accelerate loops and the ``transformers`` ``Trainer``
  (``pip install "sparsam[accelerate]"``).

What goes wrong without them, and why, is in ``docs/frameworks.md``.

Two helpers, [`pass_batch`][sparsam.integrations.pass_batch] and
[`pass_loss`][sparsam.integrations.pass_loss], are the closure contract of
[`SAM.step`][sparsam.SAM.step] (``docs/design.md``) for a loss function that sees a batch: the
part of the batch the current pass uses (sub-batch ascent, ESAM's data selection) and the
per-sample losses ESAM records. ``SAMStep``, ``SAMTrainer``, a Lightning ``training_step`` and
the engine of ``sparsam train`` use them (they live in ``sparsam.optim.passes``, which imports no
framework), so every variant runs in every framework from the same code.
"""

from __future__ import annotations

from torch import Tensor

from ..optim.passes import _batch_size as _batch_size
from ..optim.passes import _take as _take
from ..optim.passes import pass_batch, pass_loss, unwrap_optimizer

__all__ = ["pass_batch", "pass_loss", "unwrap_optimizer"]

# pass_batch, pass_loss and unwrap_optimizer live in sparsam.optim.passes, the one implementation
# of the closure contract (the engine of ``sparsam train`` uses it too); _batch_size and _take are
# imported for accelerate.py. What follows is the integrations' own part of the contract.


# ---------------------------------------------------------------------------------- accumulation windows
def _sum_for_selection(losses: Tensor, selected: int, micro_batches: int) -> Tensor:
    """A micro-batch's share of the mean over ESAM's selected samples: ``Σ losses · m / K`` for
    ``selected`` = K samples spread over ``micro_batches`` = m micro-batches (a caller that divides
    each micro-batch's loss by m, as gradient accumulation does, gets the mean over the K)."""
    if micro_batches == 1:
        return losses.mean() if losses.numel() == selected else losses.sum() / selected
    return losses.sum() * (micro_batches / selected)


def _split_index(index: Tensor, sizes: list[int]) -> list[Tensor]:
    """ESAM's ``batch_index`` over the concatenation of micro-batches of ``sizes``, as one local
    index per micro-batch."""
    if len(sizes) == 1:
        return [index]  # one micro-batch: no host synchronisation
    out, start = [], 0
    index = index.cpu()
    for size in sizes:
        inside = (index >= start) & (index < start + size)
        out.append(index[inside] - start)
        start += size
    return out
