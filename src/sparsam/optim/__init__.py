"""The optimizers, flat as in ``torch.optim``: SAM (``adaptive=True``: ASAM), Sparse SAM, Momentum-SAM,
the schedules that run the ascent on some steps only, LookSAM and ESAM."""

from .esam import ESAM
from .looksam import LookSAM, LookSSAM
from .msam import MSAM, SparseMSAM
from .sam import SAM
from .schedule import ScheduledSAM, ScheduledSSAM
from .ssam import SSAM

__all__ = ["ESAM", "MSAM", "SAM", "SSAM", "LookSAM", "LookSSAM", "ScheduledSAM", "ScheduledSSAM", "SparseMSAM"]
