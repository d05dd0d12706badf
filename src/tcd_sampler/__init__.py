"""tcd-sampler: few-step TCD sampling (Trajectory Consistency Distillation, Zheng et al. 2024) for diffusion models.

``from tcd_sampler import TCDScheduler`` is a drop-in replacement for diffusers' ``TCDScheduler``; the pure math
lives in :mod:`tcd_sampler.step`, :mod:`tcd_sampler.paths` and :mod:`tcd_sampler.timesteps`.
"""

from .config import FrozenConfig
from .paths import VPDiscretePath
from .scheduler import TCDScheduler, TCDSchedulerOutput
from .step import StepRow, StepTable, build_vp_table, tcd_step

__version__ = "0.1.0"

__all__ = [
    "FrozenConfig",
    "StepRow",
    "StepTable",
    "TCDScheduler",
    "TCDSchedulerOutput",
    "VPDiscretePath",
    "__version__",
    "build_vp_table",
    "tcd_step",
]
