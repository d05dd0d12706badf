"""Trajectory Consistency Distillation (Zheng et al. 2024), and LCM distillation as its special case, of an exact
teacher, small enough to train on a laptop CPU.

- :mod:`~tcd_sampler.distill.teacher`: the exact teacher, Gaussian-mixture data with its exact denoiser
  (:class:`GaussianMixture`, :func:`ring2d`, :func:`gmm16`, :data:`DATASETS`).
- :mod:`~tcd_sampler.distill.student`: the student MLP ``ε̂_θ(x_t, t)`` (it never sees ``s``), its card, and
  :func:`save_student` / :func:`load_student`.
- :mod:`~tcd_sampler.distill.losses`: the TCD and LCM losses, ``E‖f_θ(x_{t_{n+k}}, t_{n+k} → t_m) −
  f_θ⁻(x̂_{t_n}, t_n → t_m)‖²`` with ``x̂_{t_n}`` one teacher DDIM step from ``t_{n+k}``; LCM: ``t_m = 0`` with the
  consistency boundary condition ``f = c_skip(t)·x_t + c_out(t)·x̂0`` (LCM's scalings, ``timestep_scaling`` 10,
  ``σ_d = 0.5``), sampled with ``TCDScheduler(consistency_boundary=True)`` at ``eta = 1``.
- :mod:`~tcd_sampler.distill.config` and :mod:`~tcd_sampler.distill.trainer`: :class:`DistillConfig` and the
  seeded, deterministic run :func:`distill` (warm start, then distillation against an EMA target).
"""

from .config import DistillConfig
from .losses import ConsistencyFunction, distillation_loss
from .student import LoadedStudent, Student, load_student, save_student
from .teacher import DATASETS, GaussianMixture, gmm16, ring2d
from .trainer import distill

__all__ = [
    "DATASETS",
    "ConsistencyFunction",
    "DistillConfig",
    "GaussianMixture",
    "LoadedStudent",
    "Student",
    "distill",
    "distillation_loss",
    "gmm16",
    "load_student",
    "ring2d",
    "save_student",
]
