"""TCD's training objective on diffusers networks (Zheng et al. 2024, the training algorithm; the guide's §4):

1. ``n`` on the skip grid ``t_i = k·i − 1`` (``k`` the skipping interval, 20 for 50 grid points of 1000), the target
   ``m ≤ n`` (TCD; LCM: the clean end), a guidance scale ``ω ~ U[ω_min, ω_max]``, the noise ``ε`` — one
   :class:`Draws` for the whole global batch, so every process slices the same numbers (:meth:`Draws.rows`);
2. ``x_{t_{n+k}} = α·z + σ·ε``;
3. ``x̂_{t_n}``: one DDIM step of the teacher with classifier-free guidance;
4. ``d(f_θ(x_{t_{n+k}}, t_{n+k} → t_m), f_θ⁻(x̂_{t_n}, t_n → t_m))`` with ``f`` the trajectory consistency function
   (:func:`tcd_sampler.core.step.consistency_jump`, the sampler's own step), ``d`` pseudo-Huber or L2.

It is :func:`tcd_sampler.distill.losses.distillation_loss` — the 2-D demo's loss — on diffusers UNets.

The method ``"diffusion"`` is the ordinary denoising objective that trains a teacher in the first place (DDPM's, on
the same schedule): ``t`` uniform over ``0 … T − 1``, ``x_t = α_t·z + σ_t·ε``, and the mean squared error of the
network's output against its prediction type's target (``ε``; ``α_t·ε − σ_t·z`` for v-prediction; ``z`` for
``sample``). It has no teacher, no target network and no guidance (class or caption dropout in the data gives a
model that classifier-free guidance can use).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.checks import check_choice, check_int, check_number
from ..core.paths import VPDiscrete
from ..core.paths.base import working_dtype
from .losses import DISTANCES, METHODS, ConsistencyFunction, distillation_loss, guided, target_times
from .teachers import Conditioning, guidance_embedding, network

__all__ = ["OBJECTIVES", "Draws", "Objective", "batch_loss", "draw"]

#: The methods of an :class:`Objective`: the two distillations and the teacher's own training.
OBJECTIVES = (*METHODS, "diffusion")


@dataclass(frozen=True)
class Objective:
    """The objective's settings.

    Attributes:
        method: ``"tcd"`` (default: jumps to ``t_m ≤ t_n``), ``"lcm"`` (jumps to the clean end with LCM's boundary
            condition) or ``"diffusion"`` (train a diffusion model itself: the denoising loss, see the module's
            docstring; ``skip``, the guidance range, ``distance`` and ``huber_c`` are unused).
        skip: ``k``, the DDPM timesteps between ``t_n`` and ``t_{n+k}`` (the grid's spacing). Default 20.
        guidance_min, guidance_max: the range of the guidance scale ``ω``. Defaults 3 and 15 (the guide's, LCM's).
            Both 1: no guidance (the teacher's conditional output alone, one forward).
        distance: ``"huber"`` (default, ``c = huber_c``), ``"l2"`` or ``"l2_sum"``.
        huber_c: the pseudo-Huber ``c``. Default 0.001.
        timestep_scaling: LCM's boundary-condition scaling. Default 10.
        guidance_embedding_dim: a guidance-conditioned student (LCM's ``w``-embedding): the student and the target
            take each sample's ``ω`` as ``timestep_cond`` (:func:`~tcd_sampler.distill.teachers.guidance_embedding`
            of this width, their ``time_cond_proj_dim``); 0 (default): not conditioned.
    """

    method: str = "tcd"
    skip: int = 20
    guidance_min: float = 3.0
    guidance_max: float = 15.0
    distance: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    guidance_embedding_dim: int = 0

    def __post_init__(self) -> None:
        check_choice("method", self.method, OBJECTIVES)
        check_int("skip", self.skip, 1)
        check_number("guidance_min", self.guidance_min, 0.0, math.inf)
        check_number("guidance_max", self.guidance_max, self.guidance_min, math.inf)
        check_choice("distance", self.distance, DISTANCES)
        check_number("huber_c", self.huber_c, 0.0, math.inf, low_open=True)
        check_number("timestep_scaling", self.timestep_scaling, 0.0, math.inf, low_open=True)
        check_int("guidance_embedding_dim", self.guidance_embedding_dim, 0)
        if self.guidance_embedding_dim == 1 or (self.guidance_embedding_dim and self.method == "diffusion"):
            raise ValueError("guidance_embedding_dim must be 0 or at least 2, and 0 for the diffusion objective")


@dataclass(frozen=True)
class Draws:
    """The random numbers of one global batch: ``t_{n+k}``, ``t_n``, ``t_m`` (int64 ``(B,)``), ``ω`` ``(B,)`` and
    the noise ``ε`` (the latents' shape), drawn on the CPU."""

    t: torch.Tensor
    t_n: torch.Tensor
    t_m: torch.Tensor
    omega: torch.Tensor
    noise: torch.Tensor

    def rows(self, start: int, stop: int) -> Draws:
        """The draws of samples ``start … stop − 1`` (one process's share of the global batch)."""
        return Draws(*(v[start:stop] for v in (self.t, self.t_n, self.t_m, self.omega, self.noise)))

    def to(self, device: torch.device) -> Draws:
        """The draws on ``device``: on a CUDA device copied from pinned memory without waiting (no host sync);
        elsewhere as they are."""
        if device.type != "cuda":
            return self
        fields = (self.t, self.t_n, self.t_m, self.omega, self.noise)
        return Draws(*(v.pin_memory().to(device, non_blocking=True) for v in fields))


def draw(objective: Objective, num_train_timesteps: int, shape: tuple[int, ...], generator: torch.Generator) -> Draws:
    """The draws of a global batch of latents of ``shape`` (batch first) from ``generator``, in a fixed order."""
    batch, k = shape[0], objective.skip
    if objective.method == "diffusion":  # t uniform over the schedule; no grid, no target, no guidance
        t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(shape, generator=generator)
        return Draws(t, t, t, torch.ones(batch, dtype=torch.float64), noise)
    points = num_train_timesteps // k  # grid points k·i − 1, i = 1 … points
    if points < 2:
        raise ValueError(f"skip={k} leaves fewer than 2 grid points of num_train_timesteps={num_train_timesteps}")
    n = torch.randint(1, points, (batch,), generator=generator)
    t_n = k * n - 1
    t_m = target_times(n, k, generator)
    omega = objective.guidance_min + (objective.guidance_max - objective.guidance_min) * torch.rand(
        batch, generator=generator, dtype=torch.float64
    )
    noise = torch.randn(shape, generator=generator)
    return Draws(t_n + k, t_n, t_m, omega, noise)


def batch_loss(
    objective: Objective,
    path: VPDiscrete,
    prediction_type: str,
    student: Any,
    target: Any,
    teacher: Any,
    latents: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    draws: Draws,
) -> torch.Tensor:
    """The loss of one (local) batch.

    Args:
        objective: the settings.
        path: the teacher's discrete VP path (:func:`tcd_sampler.distill.teachers.teacher_path`).
        prediction_type: what the teacher (and the student) predict.
        student: the UNet being trained.
        target: the target UNet ``θ⁻`` (the EMA of the student; for a LoRA student the student itself), no gradients.
        teacher: the teacher UNet, no gradients.
        latents: the data latents ``z`` ``(B, C, H, W)``.
        cond, uncond: the condition and the empty condition (for guidance) of the batch.
        draws: this batch's draws (:func:`draw`, sliced to the local rows).

    Returns the scalar loss; gradients reach only ``student``. With ``objective.method == "diffusion"`` the
    denoising loss of ``student`` alone (``target``, ``teacher`` and ``uncond`` are unused and may be None).
    """
    device, dtype = latents.device, latents.dtype
    t, t_n, t_m = (v.to(device) for v in (draws.t, draws.t_n, draws.t_m))
    work = working_dtype(dtype)  # half-precision latents are noised in float32 and rounded once
    alpha, sigma = path.alpha_sigma(t, dtype=work)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    alpha, sigma, noise = alpha.reshape(shape), sigma.reshape(shape), draws.noise.to(device, work)
    x = (alpha * latents.to(work) + sigma * noise).to(dtype)
    if objective.method == "diffusion":
        goal = {"epsilon": noise, "v_prediction": alpha * noise - sigma * latents.to(work)}.get(prediction_type)
        if goal is None and prediction_type != "sample":
            raise ValueError(f"the diffusion objective trains epsilon, v_prediction or sample, not {prediction_type!r}")
        out = network(student, cond)(x, t).to(work)
        return torch.nn.functional.mse_loss(out, latents.to(work) if goal is None else goal)
    f = ConsistencyFunction(path, objective.method, objective.timestep_scaling, prediction_type)
    if objective.guidance_min == objective.guidance_max == 1.0:  # ω = 1 throughout: no guidance, one teacher forward
        guided_teacher = network(teacher, cond)
    elif uncond is None:
        raise ValueError("distillation with guidance needs uncond, the unconditional input of the teacher")
    else:
        omega = draws.omega.to(device)
        guided_teacher = guided(network(teacher, cond), network(teacher, uncond), omega)  # no grad there
    conditioned = cond  # the student's and the target's condition: with the guidance scale, when they take it
    if objective.guidance_embedding_dim:
        w = guidance_embedding(draws.omega, objective.guidance_embedding_dim).to(device, work)
        conditioned = dataclasses.replace(cond, timestep_cond=w)
    return distillation_loss(
        f, network(student, conditioned), network(target, conditioned), guided_teacher, x, t, t_n, t_m,
        objective.distance, objective.huber_c,
    )  # fmt: skip
