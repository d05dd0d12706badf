"""Integrations with other libraries. Each submodule imports its library lazily, on import of the submodule:
``tcd_sampler.integrations.diffusers`` needs diffusers; the core never does."""
