"""What determines a distillation run: :class:`DistillConfig`, recorded in every student's card (its own module
because the trainer writes it and :func:`~tcd_sampler.distill.student.load_student` reads it back)."""

from __future__ import annotations

from dataclasses import dataclass

from .teacher import DATASETS

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (recorded in the student's card). Invalid values raise
    ValueError on construction.

    Attributes:
        method: ``"tcd"`` (default) or ``"lcm"``.
        data: a key of :data:`~tcd_sampler.distill.teacher.DATASETS`. Default ``"ring2d"``.
        steps: distillation steps. Default 4000.
        warmup_steps: teacher-regression steps before them. Default 3000.
        batch_size: samples per step. Default 1024.
        lr: Adam's learning rate for the distillation. Default 2e-4.
        warmup_lr: Adam's learning rate for the warm start. Default 1e-3.
        ema_decay: the decay of ``θ⁻``, in [0, 1). Default 0.95.
        skip: ``k``, the skip between grid points; it must divide ``num_train_timesteps``. Default 20.
        num_train_timesteps: T (50 grid points with the default skip). Default 1000.
        hidden: the student MLP's width. Default 128.
        depth: its number of hidden layers. Default 3.
        time_features: its number of time-embedding frequencies. Default 16.
        timestep_scaling: LCM's boundary-condition scaling. Default 10.
        seed: seeds the initialisation and every draw. Default 0.
    """

    method: str = "tcd"
    data: str = "ring2d"
    steps: int = 4000
    warmup_steps: int = 3000
    batch_size: int = 1024
    lr: float = 2e-4
    warmup_lr: float = 1e-3
    ema_decay: float = 0.95
    skip: int = 20
    num_train_timesteps: int = 1000
    hidden: int = 128
    depth: int = 3
    time_features: int = 16
    timestep_scaling: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("tcd", "lcm"):
            raise ValueError(f"method must be 'tcd' or 'lcm', got {self.method!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {sorted(DATASETS)}, got {self.data!r}")
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.num_train_timesteps % self.skip:
            raise ValueError(f"skip={self.skip} must divide num_train_timesteps={self.num_train_timesteps}")
