"""The toy distillation run: :func:`distill` trains a :class:`~tcd_sampler.distill.student.Student` from the exact
teacher of :mod:`tcd_sampler.distill.teacher` with the loss of :mod:`tcd_sampler.distill.losses`.

- Warm start: a plain regression of ``ε̂_θ`` onto the teacher's exact ``ε`` at every timestep (the role of
  initialising a distilled model from its teacher's weights); both methods start from the same one.
- Distillation: ``t_n`` on the skip grid ``{k·i − 1}`` (k = 20 of T = 1000, 50 points), ``x_{t_{n+k}}`` fresh data
  noised to ``t_{n+k}``, ``t_m`` uniform over the grid points in ``[0, t_n]`` (TCD; LCM jumps to 0), and the target
  network ``θ⁻`` an EMA of ``θ`` (decay 0.95, as LCM), updated after every Adam step.

Every draw comes from one generator seeded by the config (the initialisation from torch's global RNG, seeded the
same): training is deterministic on the CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm.auto import trange

from ..core.paths import VPDiscrete
from ..schedulers.vp import TCDScheduler
from .config import DistillConfig
from .losses import ConsistencyFunction, distillation_loss, ema_update, target_times
from .student import Student, student_card
from .teacher import DATASETS

__all__ = ["distill"]


def _schedule(config: DistillConfig) -> torch.Tensor:
    """``ᾱ_t`` on the grid (float32) of the default TCDScheduler: SD's scaled-linear betas."""
    return TCDScheduler(num_train_timesteps=config.num_train_timesteps).alphas_cumprod


def distill(config: DistillConfig, progress: bool = True, log_every: int = 50) -> tuple[Student, dict[str, Any]]:
    """Train a student; returns it (the EMA weights ``θ⁻``, which are what consistency models sample with) and its
    card (:func:`~tcd_sampler.distill.student.student_card`: the config, the teacher's data, and the loss curves).

    Args:
        config: the run.
        progress: show a progress bar for each phase. Default True.
        log_every: record the loss every this many steps. Default 50.
    """
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    mixture = DATASETS[config.data]()
    acp = _schedule(config)
    path = VPDiscrete(acp)  # the one path the noising, the teacher step and both consistency functions read
    teacher = mixture.vp_model(acp)
    student = Student(mixture.dim, config.hidden, config.depth, config.time_features, config.num_train_timesteps)
    T, k, B = config.num_train_timesteps, config.skip, config.batch_size

    def noised(t: torch.Tensor) -> torch.Tensor:
        x0 = mixture.sample(B, g)[0].float()
        eps = torch.randn(B, mixture.dim, generator=g)
        alpha, sigma = path.alpha_sigma(t, torch.float32)
        return alpha[:, None] * x0 + sigma[:, None] * eps

    # 1. warm start: ε̂_θ ≈ the teacher's exact ε at every timestep
    warm_losses: list[float] = []
    opt = torch.optim.Adam(student.parameters(), lr=config.warmup_lr)
    for step in trange(config.warmup_steps, disable=not progress, desc="warm start"):
        t = torch.randint(0, T, (B,), generator=g)
        x_t = noised(t)
        loss = ((student(x_t, t) - teacher(x_t, t)) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0:
            warm_losses.append(loss.item())

    # 2. consistency distillation against the EMA target θ⁻
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    f = ConsistencyFunction(path, config.method, config.timestep_scaling)
    points = T // k  # grid points k·i − 1, i = 1 … points
    losses: list[float] = []
    for step in trange(config.steps, disable=not progress, desc=f"{config.method} distillation"):
        n = torch.randint(1, points, (B,), generator=g)  # t_n = k·n − 1 ∈ [19, 979]
        t_n = k * n - 1
        t_nk = t_n + k
        x_nk = noised(t_nk)
        t_m = target_times(n, k, g)  # drawn for LCM too, which ignores it, so both methods see the same stream
        loss = distillation_loss(f, student, ema, teacher, x_nk, t_nk, t_n, t_m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, student, config.ema_decay)
        if step % log_every == 0:
            losses.append(loss.item())

    return ema, student_card(config, mixture, log_every, warm_losses, losses)
