"""Trajectory Consistency Distillation (Zheng et al. 2024) of the exact teacher in :mod:`tcd_sampler.toy`, and LCM
distillation as its special case, small enough to train on a laptop CPU.

- The student ``ε̂_θ(x_t, t)`` is an MLP with a sinusoidal time embedding; it never sees ``s``.
- The trajectory consistency function of first order is the DDIM jump
  ``f_θ(x_t, t → s) = α_s·x̂0 + σ_s·ε̂`` with ``x̂0 = (x_t − σ_t·ε̂)/α_t``.
- TCD loss: ``E‖f_θ(x_{t_{n+k}}, t_{n+k} → t_m) − f_θ⁻(x̂_{t_n}, t_n → t_m)‖²`` with ``t_n`` on the skip grid
  ``{k·i − 1}`` (k = 20 of T = 1000, 50 points), ``x̂_{t_n}`` one teacher DDIM step from ``t_{n+k}``, ``t_m`` uniform
  over the grid points in ``[0, t_n]`` (0 included: the end of every TCD sampling run), and ``θ⁻`` an EMA of ``θ``
  (decay 0.95, as LCM).
- LCM: ``t_m = 0`` with the consistency boundary condition ``f = c_skip(t)·x_t + c_out(t)·x̂0`` (LCM's scalings,
  ``timestep_scaling`` 10, ``σ_d = 0.5``), sampled with ``TCDScheduler(consistency_boundary=True)`` at ``eta = 1``.

Both students start from the same warm start, a plain regression of ``ε̂_θ`` onto the teacher's exact ``ε`` (the
role of initialising a distilled model from its teacher's weights). Training is seeded and deterministic on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import trange

from ._files import atomic_paths, folder_problem
from .core.step import consistency_function
from .core.table import boundary_scalings
from .schedulers.vp import TCDScheduler
from .toy import GaussianMixture, gmm16, ring2d

__all__ = [
    "DATASETS",
    "DistillConfig",
    "Student",
    "distill",
    "load_student",
    "save_student",
]

#: Datasets by name.
DATASETS: dict[str, Callable[[], GaussianMixture]] = {"ring2d": ring2d, "gmm16": gmm16}

WEIGHTS_NAME = "student.safetensors"
CARD_NAME = "card.json"


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (recorded in the student's card).

    Attributes:
        method: ``"tcd"`` or ``"lcm"``.
        data: a key of :data:`DATASETS`.
        steps: distillation steps. warmup_steps: teacher-regression steps before them.
        batch_size, lr, warmup_lr: optimisation (Adam).
        ema_decay: the decay of ``θ⁻``.
        skip: ``k``, the skip between grid points; ``num_train_timesteps``: T (50 grid points by default).
        hidden, depth, time_features: the student MLP.
        timestep_scaling: LCM's boundary-condition scaling.
        seed: seeds the initialisation and every draw.
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


class Student(nn.Module):
    """``ε̂_θ(x_t, t)``: an MLP on ``[x_t, sin/cos(t/T · 2π·f)]`` (``time_features`` log-spaced frequencies)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_features: int = 16, T: int = 1000) -> None:
        super().__init__()
        self.dim, self.T = dim, T
        self.register_buffer("freqs", torch.logspace(0, math.log10(200.0), time_features), persistent=False)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * time_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """``ε̂`` at ``x`` and integer (or real) timesteps ``t`` (scalar or ``(B,)``)."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        phase = 2 * math.pi * (tt / self.T) * self.freqs  # type: ignore[operator]
        return self.net(torch.cat([x.float(), phase.sin(), phase.cos()], dim=1)).to(x.dtype)


def _schedule(config: DistillConfig) -> torch.Tensor:
    """``ᾱ_t`` on the grid (float32) of the default TCDScheduler: SD's scaled-linear betas."""
    return TCDScheduler(num_train_timesteps=config.num_train_timesteps).alphas_cumprod


def distill(config: DistillConfig, progress: bool = True, log_every: int = 50) -> tuple[Student, dict[str, Any]]:
    """Train a student; returns it (the EMA weights ``θ⁻``, which are what consistency models sample with) and a
    card: the config, the teacher's data, and the loss curves."""
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    mixture = DATASETS[config.data]()
    acp = _schedule(config)
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    teacher = mixture.vp_model(acp)
    student = Student(mixture.dim, config.hidden, config.depth, config.time_features, config.num_train_timesteps)
    T, k, B = config.num_train_timesteps, config.skip, config.batch_size

    def noised(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = mixture.sample(B, g)[0].float()
        eps = torch.randn(B, mixture.dim, generator=g)
        return alpha[t, None] * x0 + sigma[t, None] * eps, x0, eps

    # 1. warm start: ε̂_θ ≈ the teacher's exact ε at every timestep
    warm_losses: list[float] = []
    opt = torch.optim.Adam(student.parameters(), lr=config.warmup_lr)
    for step in trange(config.warmup_steps, disable=not progress, desc="warm start"):
        t = torch.randint(0, T, (B,), generator=g)
        x_t, _, _ = noised(t)
        loss = ((student(x_t, t) - teacher(x_t, t)) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0:
            warm_losses.append(loss.item())

    # 2. consistency distillation against the EMA target θ⁻
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    points = T // k  # grid points k·i − 1, i = 1 … points
    losses: list[float] = []

    one, zero = torch.ones(B), torch.zeros(B)

    def consistency(model: nn.Module, x: torch.Tensor, t: torch.Tensor, t_m: torch.Tensor) -> torch.Tensor:
        if config.method == "lcm":  # t_m = 0, the clean end (α = 1, σ = 0), with LCM's boundary condition
            boundary = boundary_scalings(t, config.timestep_scaling)
            return consistency_function(model(x, t), x, alpha[t], sigma[t], one, zero, boundary=boundary)
        return consistency_function(model(x, t), x, alpha[t], sigma[t], alpha[t_m], sigma[t_m])

    for step in trange(config.steps, disable=not progress, desc=f"{config.method} distillation"):
        n = torch.randint(1, points, (B,), generator=g)  # t_n = k·n − 1 ∈ [19, 979]
        t_n = k * n - 1
        t_nk = t_n + k
        x_nk, _, _ = noised(t_nk)
        with torch.no_grad():  # one teacher DDIM step t_{n+k} → t_n
            eps_teacher = teacher(x_nk, t_nk).float()
            x0_teacher = (x_nk - sigma[t_nk, None] * eps_teacher) / alpha[t_nk, None]
            x_n = alpha[t_n, None] * x0_teacher + sigma[t_n, None] * eps_teacher
            # t_m uniform over the grid points in [0, t_n]: 0 or k·j − 1 for j = 1 … n
            j = (torch.rand(B, generator=g) * (n + 1).float()).long()
            t_m = torch.where(j == 0, torch.zeros_like(j), k * j - 1)
            target = consistency(ema, x_n, t_n, t_m)
        loss = ((consistency(student, x_nk, t_nk, t_m) - target) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        if step % log_every == 0:
            losses.append(loss.item())

    card = {
        "config": asdict(config),
        "data": {"name": mixture.name, "dim": mixture.dim, "modes": len(mixture.weights)},
        "loss_every": log_every,
        "warm_start_loss": warm_losses,
        "loss": losses,
        "sampler": "TCDScheduler()" if config.method == "tcd" else "TCDScheduler(consistency_boundary=True), eta=1",
        "torch": torch.__version__,
    }
    return ema, card


@dataclass
class LoadedStudent:
    """A student read back from disk, with its card."""

    model: Student
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> DistillConfig:
        return DistillConfig(**self.card["config"])


def save_student(model: Student, card: dict[str, Any], directory: str | Path) -> Path:
    """Write ``student.safetensors`` and ``card.json`` into ``directory`` (created if missing), atomically: both are
    written to temporary files first and then renamed into place, so a failure leaves no half-written file (and
    an existing student there untouched unless the failure falls between the two renames). Returns the folder."""
    from safetensors.torch import save_file

    path = Path(directory)
    problem = folder_problem(path)
    if problem:
        raise NotADirectoryError(f"cannot save the student in {path}: {problem}")
    path.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path / WEIGHTS_NAME, path / CARD_NAME) as (weights, card_file):
        try:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        except Exception as err:  # safetensors' own error type (a full disk, …) is not an OSError
            raise OSError(f"could not write {path / WEIGHTS_NAME}: {err}") from err
        card_file.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def load_student(directory: str | Path) -> LoadedStudent:
    """Read a student written by :func:`save_student` (e.g. the ones shipped in ``tcd_sampler/assets``)."""
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CARD_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME} and {CARD_NAME}")
    card = json.loads((path / CARD_NAME).read_text(encoding="utf-8"))
    config = DistillConfig(**card["config"])
    model = Student(card["data"]["dim"], config.hidden, config.depth, config.time_features, config.num_train_timesteps)
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return LoadedStudent(model.eval().requires_grad_(False), card)
