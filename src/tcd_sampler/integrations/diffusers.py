"""The schedulers as diffusers components: use these classes inside diffusers pipelines.

They are the core classes with diffusers' ``SchedulerMixin`` and ``ConfigMixin`` added, so diffusers treats them as
its own: ``pipe.save_pretrained(dir)`` writes them (as ``["tcd_sampler.integrations.diffusers", "TCDScheduler"]`` in
``model_index.json``) and ``DiffusionPipeline.from_pretrained(dir)`` loads them back, provided this module has been
imported first (diffusers 0.42 imports third-party component modules only when the caller already did). All
behaviour, config handling and math are the core's; the mixins contribute only their type.

    from tcd_sampler.integrations.diffusers import TCDScheduler, FlowMatchTCDScheduler
"""

from __future__ import annotations

try:
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
except ImportError as err:  # pragma: no cover - exercised without diffusers
    raise ImportError(
        "tcd_sampler.integrations.diffusers needs diffusers: pip install 'tcd-sampler[diffusers]'. "
        "Without it, use tcd_sampler.TCDScheduler / tcd_sampler.FlowMatchTCDScheduler directly."
    ) from err

from .. import flow, scheduler

__all__ = ["FlowMatchTCDScheduler", "TCDScheduler"]


# The core's config methods come first in the MRO and replace the mixins' (their signatures differ: mypy's misc).


class TCDScheduler(scheduler.TCDScheduler, SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """:class:`tcd_sampler.TCDScheduler` as a diffusers component (saved and loaded with pipelines)."""


class FlowMatchTCDScheduler(flow.FlowMatchTCDScheduler, SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """:class:`tcd_sampler.FlowMatchTCDScheduler` as a diffusers component (saved and loaded with pipelines)."""
