"""tcd-sampler: few-step TCD sampling (Trajectory Consistency Distillation, Zheng et al. 2024) for diffusion models.

``from tcd_sampler import TCDScheduler`` is a drop-in replacement for diffusers' ``TCDScheduler``;
``FlowMatchTCDScheduler`` brings TCD to flow-matching pipelines (SD3, FLUX); ``sample_tcd`` / ``sample_tcd_rf`` are
k-diffusion-style samplers in sigma space. The pure math, shared by sampling and training, lives in
:mod:`tcd_sampler.core` (paths, predictions, tables, the step, schedules); the scheduler classes in
:mod:`tcd_sampler.schedulers`.
"""

from .core.paths import EDM, VE, DiscreteVPTime, RectifiedFlow, VPDiscrete, VPDiscretePath
from .core.step import consistency_jump, tcd_step
from .core.table import StepRow, StepTable, build_table, build_vp_table
from .sampling import sample_tcd, sample_tcd_rf
from .schedulers.config_file import FrozenConfig
from .schedulers.flow import FlowMatchTCDScheduler
from .schedulers.output import FlowMatchTCDSchedulerOutput, TCDSchedulerOutput
from .schedulers.vp import TCDScheduler

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "VE",
    "DiscreteVPTime",
    "FlowMatchTCDScheduler",
    "FlowMatchTCDSchedulerOutput",
    "FrozenConfig",
    "RectifiedFlow",
    "StepRow",
    "StepTable",
    "TCDScheduler",
    "TCDSchedulerOutput",
    "VPDiscrete",
    "VPDiscretePath",
    "__version__",
    "build_table",
    "build_vp_table",
    "consistency_jump",
    "sample_tcd",
    "sample_tcd_rf",
    "tcd_step",
]
