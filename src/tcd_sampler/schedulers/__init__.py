"""The diffusers-compatible scheduler front ends: :class:`~tcd_sampler.schedulers.vp.TCDScheduler` (discrete VP),
:class:`~tcd_sampler.schedulers.flow.FlowMatchTCDScheduler` (flow matching), their shared step template and counter
(:mod:`~tcd_sampler.schedulers.base`), config plumbing (:mod:`~tcd_sampler.schedulers.configuring`,
:mod:`~tcd_sampler.schedulers.config_file`), config checks (:mod:`~tcd_sampler.schedulers.validation`) and step
output (:mod:`~tcd_sampler.schedulers.output`)."""
