"""Gaussian paths ``x_t = α_t·x0 + σ_t·ε``, each in its own time: one class a path, with the :class:`Path` interface
(``alpha_sigma`` on arrays or tensors, batched and differentiable; ``coefficients`` for the table builder; TCD's
``target`` ``s = (1 − γ)·t'``, never above ``t'``; ``sigma_to_t`` / ``t_to_sigma``, the time ↔ a k-diffusion sampler's
sigma). Here: :class:`VPDiscrete` (DDPM's integer grid, also a discrete VP model's time map in VE sigma), :class:`VE`
(``x = x0 + σ·ε``, optionally in a model's own time), :class:`EDM` (VE with Karras et al.'s preconditioning) and
:class:`RectifiedFlow` (``x = (1 − t)·x0 + t·ε``).
"""

from .base import Columns, Path, TCDTime, TimeMap, closed_form_coefficients, target_timesteps
from .continuous import EDM, VE, RectifiedFlow
from .vp import DiscreteVPTime, VPDiscrete, VPDiscretePath

__all__ = [
    "EDM",
    "VE",
    "Columns",
    "DiscreteVPTime",
    "Path",
    "RectifiedFlow",
    "TCDTime",
    "TimeMap",
    "VPDiscrete",
    "VPDiscretePath",
    "closed_form_coefficients",
    "target_timesteps",
]
