"""The TCD and LCM distillation losses (Zheng et al. 2024, the training algorithm), on any ε-, x0- or v-predicting
networks on a discrete VP schedule: nothing here knows the toy teacher, the student's architecture or the data.

One training example is a noisy ``x`` at ``t = t_{n+k}``, its grid point ``t_n = t − k`` and a target time ``t_m``:

- the teacher takes one DDIM step ``t_{n+k} → t_n`` (:meth:`ConsistencyFunction.teacher_step`), giving ``x̂_{t_n}``;
- the target is the EMA network's consistency function from there, ``f_θ⁻(x̂_{t_n}, t_n → t_m)``;
- the loss is ``‖f_θ(x, t_{n+k} → t_m) − f_θ⁻(x̂_{t_n}, t_n → t_m)‖²``, summed per sample, averaged over the batch
  (:func:`distillation_loss`).

The consistency function ``f`` (:class:`ConsistencyFunction`) is :func:`tcd_sampler.core.step.consistency_jump` on
the schedule's :class:`~tcd_sampler.core.paths.VPDiscrete` path, the training form of the sampling step: for TCD the
jump to ``t_m`` (drawn uniformly over the grid points in ``[0, t_n]`` by :func:`target_times`); for LCM the jump to
the clean end (``α = 1, σ = 0``, ``t_m`` unused) with LCM's consistency boundary condition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.paths import VPDiscrete
from ..core.step import consistency_jump
from .sharding import local_tensor

__all__ = [
    "DISTANCES",
    "METHODS",
    "ConsistencyFunction",
    "distance",
    "distillation_loss",
    "ema_update",
    "guided",
    "target_times",
]

#: The distillation methods: TCD (jumps to ``t_m``) and LCM (jumps to the clean end, with the boundary condition).
METHODS = ("tcd", "lcm")

Model = Callable[[torch.Tensor, Any], torch.Tensor]  # (x_t, integer timesteps (B,)) → output


def target_times(n: torch.Tensor, skip: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """TCD's target times ``t_m``, uniform over the grid points in ``[0, t_n]``: 0 or ``k·j − 1`` for ``j = 1 … n``.

    Args:
        n: the grid index of each sample's ``t_n = k·n − 1``, int64 ``(B,)``.
        skip: ``k``, the skip between grid points.
        generator: the generator of the one uniform draw per sample; None (default) is torch's global RNG.
    """
    j = (torch.rand(n.shape[0], generator=generator) * (n + 1).float()).long()
    return torch.where(j == 0, torch.zeros_like(j), skip * j - 1)


@dataclass(frozen=True, eq=False)
class ConsistencyFunction:
    """The consistency function ``f(x, t → t_m)`` of one method on one discrete VP schedule.

    Attributes:
        path: the schedule's discrete VP path (its ``α, σ`` are read in the precision of the inputs).
        method: ``"tcd"`` (default) jumps to ``t_m``; ``"lcm"`` jumps to the clean end with LCM's boundary
            condition. Anything else raises ValueError.
        timestep_scaling: LCM's boundary-condition scaling. Default 10.
        prediction_type: what the networks predict (a key of the prediction registry). Default ``"epsilon"``.
    """

    path: VPDiscrete
    method: str = "tcd"
    timestep_scaling: float = 10.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def __call__(self, model: Model, x: torch.Tensor, t: torch.Tensor, t_m: torch.Tensor) -> torch.Tensor:
        """``f_model(x, t → t_m)``, differentiable.

        Args:
            model: the network, ``model(x, t)``.
            x: the noisy input, ``(B, …)``.
            t: its integer timesteps, ``(B,)``.
            t_m: the target timesteps, ``(B,)`` (unused by LCM).
        """
        output = model(x, t)
        if self.method == "lcm":  # t_m = 0, the clean end (α = 1, σ = 0), with LCM's boundary condition
            end = torch.zeros_like(t)
            return consistency_jump(output, x, t, end, self.path, self.prediction_type, self.timestep_scaling, True)
        return consistency_jump(output, x, t, t_m, self.path, self.prediction_type)

    def teacher_step(self, teacher: Model, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step of the teacher, ``x_t → x̂_{t_prev}``, without gradients.

        Args:
            teacher: the teacher network, ``teacher(x, t)``; its output is cast to the dtype of ``x``.
            x: the noisy input at ``t``, ``(B, …)``.
            t: its integer timesteps, ``(B,)``.
            t_prev: the timesteps to step to, ``(B,)``.
        """
        with torch.no_grad():
            output = teacher(x, t).to(x.dtype)
            return consistency_jump(output, x, t, t_prev, self.path, self.prediction_type)


#: The distances ``d(pred, target)`` of the loss: ``"l2_sum"`` (the squared error summed over a sample's entries,
#: averaged over the batch: the 2-D demo's), ``"l2"`` (averaged over every entry: diffusers' LCM script's ``mse``) and
#: ``"huber"`` (the pseudo-Huber ``√((pred − target)² + c²) − c`` averaged over every entry, LCM's default).
DISTANCES = ("l2_sum", "l2", "huber")


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2_sum", huber_c: float = 0.001) -> torch.Tensor:
    """The scalar distance ``d(pred, target)`` of kind ``kind`` (:data:`DISTANCES`; default ``"l2_sum"``), computed
    in float32 at least; ``huber_c`` is the pseudo-Huber ``c`` (default 0.001, LCM's)."""
    diff = pred.float() - target.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred - target
    if kind == "l2_sum":
        return (diff**2).flatten(1).sum(1).mean()
    if kind == "l2":
        return (diff**2).mean()
    if kind == "huber":
        return (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()
    raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")


def guided(conditional: Model, unconditional: Model, omega: torch.Tensor) -> Model:
    """Classifier-free guidance of a teacher, ``m_u + ω·(m_c − m_u)`` with a guidance scale per sample ``omega``
    ``(B,)`` (the paper samples ``ω ~ U[ω_min, ω_max]``): a model ``(x, t) → m`` for :meth:`ConsistencyFunction.
    teacher_step`. Half-precision outputs are combined in float32 (``ω`` up to 15 multiplies their rounding)."""

    def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m_c, m_u = conditional(x, t), unconditional(x, t)
        if m_c.dtype in (torch.float16, torch.bfloat16):
            m_c, m_u = m_c.float(), m_u.float()
        w = omega.to(m_c.dtype).reshape((-1,) + (1,) * (m_c.ndim - 1))
        return m_u + w * (m_c - m_u)

    return teacher


def distillation_loss(
    f: ConsistencyFunction,
    student: Model,
    target_model: Model,
    teacher: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    t_n: torch.Tensor,
    t_m: torch.Tensor,
    kind: str = "l2_sum",
    huber_c: float = 0.001,
) -> torch.Tensor:
    """The consistency distillation loss of one batch, ``d(f_student(x, t → t_m), f_target(x̂_{t_n}, t_n → t_m))``
    with ``x̂_{t_n}`` the teacher's DDIM step from ``(x, t)``; gradients reach only ``student``.

    Args:
        f: the consistency function (schedule, method, prediction type).
        student: the network being trained, ``student(x, t)``.
        target_model: the target network ``θ⁻`` (the EMA of the student, or the student itself), without gradients.
        teacher: the teacher network (with guidance: :func:`guided`).
        x: the noisy input at ``t = t_{n+k}``, ``(B, …)``.
        t: its integer timesteps ``t_{n+k}``, ``(B,)``.
        t_n: the grid points one skip earlier, ``(B,)``.
        t_m: the target timesteps (:func:`target_times`), ``(B,)``; unused by LCM.
        kind: the distance (:data:`DISTANCES`). Default ``"l2_sum"``.
        huber_c: the pseudo-Huber ``c``. Default 0.001.

    Returns the scalar loss.
    """
    x_n = f.teacher_step(teacher, x, t, t_n)
    with torch.no_grad():
        target = f(target_model, x_n, t_n, t_m)
    return distance(f(student, x, t, t_m), target, kind, huber_c)


#: Bytes of the student copied to the host at a time for an EMA target there (:func:`ema_update`).
EMA_CHUNK = 256 << 20


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """The loss's target network as the exponential moving average of the student: ``θ⁻ ← μ·θ⁻ + (1 − μ)·θ`` with
    ``μ = decay``, parameter by parameter (the two networks have the same architecture), in one ``_foreach_lerp_``.
    Sharded networks (:func:`tcd_sampler.distill.sharding.shard`, both alike) update their local shards: no
    communication. A target on another device than the source (an EMA in host memory) is updated there, the source
    copied over in chunks of :data:`EMA_CHUNK` bytes."""
    targets, sources = list(target.parameters()), list(source.parameters())
    if len(targets) != len(sources):
        raise ValueError(f"ema_update: the target has {len(targets)} parameters, the source {len(sources)}")
    if not targets:
        return
    local_targets, local_sources = [local_tensor(p) for p in targets], [local_tensor(p) for p in sources]
    if local_targets[0].device == local_sources[0].device:
        torch._foreach_lerp_(local_targets, local_sources, 1 - decay)
        return
    # a target in host memory (TrainConfig.ema_device): the source copied over in chunks of about EMA_CHUNK bytes
    start = 0
    while start < len(local_targets):
        stop, size = start, 0
        while stop < len(local_targets) and (stop == start or size < EMA_CHUNK):
            size += local_sources[stop].numel() * local_sources[stop].element_size()
            stop += 1
        copies = [s.to(t.device) for s, t in zip(local_sources[start:stop], local_targets[start:stop], strict=True)]
        torch._foreach_lerp_(local_targets[start:stop], copies, 1 - decay)
        start = stop
