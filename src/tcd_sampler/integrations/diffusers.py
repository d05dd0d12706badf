"""The schedulers as diffusers components: use these classes inside diffusers pipelines.

They are the core classes as subclasses of diffusers' own ``TCDScheduler`` and ``FlowMatchEulerDiscreteScheduler``,
so diffusers and the code built on it treat them as those: ``isinstance(scheduler, diffusers.TCDScheduler)`` holds
(InvokeAI decides its TCD settings that way, several flow pipelines theirs by ``FlowMatchEulerDiscreteScheduler``),
``pipe.save_pretrained(dir)`` writes them (as ``["tcd_sampler.integrations.diffusers", "TCDScheduler"]`` in
``model_index.json``) and ``DiffusionPipeline.from_pretrained(dir)`` loads them back, provided this module has been
imported first (diffusers 0.42 imports third-party component modules only when the caller already did).

All behaviour, config handling and math are the core's: its methods come first in the method order, and the few
private helpers of the diffusers classes that the core does not have are replaced here, so nothing of diffusers'
state machine runs.

    from tcd_sampler.integrations.diffusers import TCDScheduler, FlowMatchTCDScheduler
"""

from __future__ import annotations

from typing import Any, NoReturn

try:
    import diffusers

    # diffusers' pipeline loader looks its base classes up by name in a component's module: they must be here
    from diffusers.configuration_utils import ConfigMixin  # noqa: F401
    from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised without diffusers
    raise ImportError(
        "tcd_sampler.integrations.diffusers needs diffusers: pip install 'tcd-sampler[diffusers]'. "
        "Without it, use tcd_sampler.TCDScheduler / tcd_sampler.FlowMatchTCDScheduler directly."
    ) from err

import torch

from ..core.step import clip_x0, dynamic_threshold_x0
from ..schedulers import flow, vp

__all__ = ["FlowMatchTCDScheduler", "TCDScheduler"]


def _not_here(name: str, owner: str) -> NoReturn:
    raise NotImplementedError(f"{name} belongs to diffusers' {owner} state machine, which this class does not run")


# The core's methods come first in the MRO and replace diffusers'.


class TCDScheduler(vp.TCDScheduler, diffusers.TCDScheduler):
    """:class:`tcd_sampler.TCDScheduler` as a diffusers component (a ``diffusers.TCDScheduler`` subclass, saved and
    loaded with pipelines)."""

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The configured thresholding (or clipping) of ``x̂0``; the identity when neither is on."""
        c = self._active
        if c["thresholding"]:
            return dynamic_threshold_x0(sample, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        if c["clip_sample"]:
            return clip_x0(sample, c["clip_sample_range"])
        return sample

    def _get_variance(self, *args: Any, **kwargs: Any) -> NoReturn:
        _not_here("_get_variance", "DDIM")


class FlowMatchTCDScheduler(flow.FlowMatchTCDScheduler, diffusers.FlowMatchEulerDiscreteScheduler):
    """:class:`tcd_sampler.FlowMatchTCDScheduler` as a diffusers component (a ``FlowMatchEulerDiscreteScheduler``
    subclass, saved and loaded with pipelines)."""
