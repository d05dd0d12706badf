"""tcd-sampler: few-step TCD sampling (Trajectory Consistency Distillation, Zheng et al. 2024) for diffusion models.

``from tcd_sampler import TCDScheduler`` is a drop-in replacement for diffusers' ``TCDScheduler``;
``FlowMatchTCDScheduler`` brings TCD to flow-matching pipelines (SD3, FLUX); ``sample_tcd`` / ``sample_tcd_rf`` are
k-diffusion-style samplers in sigma space. The pure math lives in :mod:`tcd_sampler.step`,
:mod:`tcd_sampler.paths` and :mod:`tcd_sampler.timesteps`.
"""

from .config import FrozenConfig
from .flow import FlowMatchTCDScheduler, FlowMatchTCDSchedulerOutput
from .paths import VPDiscretePath
from .sampling import DiscreteVPTime, sample_tcd, sample_tcd_rf
from .scheduler import TCDScheduler, TCDSchedulerOutput
from .step import StepRow, StepTable, build_vp_table, tcd_step

__version__ = "0.1.0"

__all__ = [
    "DiscreteVPTime",
    "FlowMatchTCDScheduler",
    "FlowMatchTCDSchedulerOutput",
    "FrozenConfig",
    "StepRow",
    "StepTable",
    "TCDScheduler",
    "TCDSchedulerOutput",
    "VPDiscretePath",
    "__version__",
    "build_vp_table",
    "sample_tcd",
    "sample_tcd_rf",
    "tcd_step",
]
