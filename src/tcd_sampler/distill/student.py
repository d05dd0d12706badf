"""The student network and how it is stored: :class:`Student` (the MLP ``ε̂_θ(x_t, t)``), its card (the run's
config, the teacher's data and the loss curves: :func:`student_card`), and :func:`save_student` /
:func:`load_student` (``student.safetensors`` + ``card.json``, the format of the students shipped in
``tcd_sampler/assets``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_paths, folder_problem
from .config import DistillConfig
from .teacher import GaussianMixture

__all__ = ["CARD_NAME", "WEIGHTS_NAME", "LoadedStudent", "Student", "load_student", "save_student", "student_card"]

#: The weights' file name in a student's folder.
WEIGHTS_NAME = "student.safetensors"
#: The card's file name in a student's folder.
CARD_NAME = "card.json"


class Student(nn.Module):
    """``ε̂_θ(x_t, t)``: an MLP on ``[x_t, sin/cos(t/T · 2π·f)]`` (``time_features`` log-spaced frequencies ``f``
    from 1 to 200); it never sees the target time ``s``.

    Args:
        dim: the data's dimension.
        hidden: the width of the hidden layers. Default 128.
        depth: the number of hidden layers. Default 3.
        time_features: the number of time-embedding frequencies. Default 16.
        T: the number of training timesteps, which scales ``t``. Default 1000.
    """

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
        """``ε̂`` at ``x`` (``(B, dim)``) and integer (or real) timesteps ``t`` (scalar or ``(B,)``)."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        phase = 2 * math.pi * (tt / self.T) * self.freqs  # type: ignore[operator]
        return self.net(torch.cat([x.float(), phase.sin(), phase.cos()], dim=1)).to(x.dtype)


def student_card(
    config: DistillConfig,
    mixture: GaussianMixture,
    log_every: int,
    warm_start_loss: list[float],
    loss: list[float],
) -> dict[str, Any]:
    """The card of a trained student (what ``card.json`` holds).

    Args:
        config: the run's config.
        mixture: the teacher's data (its name, dimension and number of modes are recorded).
        log_every: how many steps apart the recorded losses are.
        warm_start_loss: the warm start's losses, one every ``log_every`` steps.
        loss: the distillation's losses, one every ``log_every`` steps.

    Returns the config, the data, the loss curves, the sampler the student is meant for, and torch's version."""
    return {
        "config": asdict(config),
        "data": {"name": mixture.name, "dim": mixture.dim, "modes": len(mixture.weights)},
        "loss_every": log_every,
        "warm_start_loss": warm_start_loss,
        "loss": loss,
        "sampler": "TCDScheduler()" if config.method == "tcd" else "TCDScheduler(consistency_boundary=True), eta=1",
        "torch": torch.__version__,
    }


@dataclass
class LoadedStudent:
    """A student read back from disk, with its card.

    Attributes:
        model: the network, in eval mode and without gradients.
        card: its card (:func:`student_card`). Default empty.
    """

    model: Student
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> DistillConfig:
        """The config recorded in the card."""
        return DistillConfig(**self.card["config"])


def save_student(model: Student, card: dict[str, Any], directory: str | Path) -> Path:
    """Write ``student.safetensors`` and ``card.json`` into ``directory`` (created if missing), atomically: both are
    written to temporary files first and then renamed into place, so a failure leaves no half-written file (and
    an existing student there untouched unless the failure falls between the two renames). Returns the folder.

    Args:
        model: the student to save.
        card: its card (:func:`student_card`), written as JSON.
        directory: the folder; NotADirectoryError if it is a file or cannot be written.
    """
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
    """Read a student written by :func:`save_student` (e.g. the ones shipped in ``tcd_sampler/assets``).

    A shipped student is checked against the package's manifest first (:func:`tcd_sampler.assets.verify`), and any
    student against the ``files`` its card records, if it records them
    (:func:`~tcd_sampler.distill.export.verify_card_files`).

    Args:
        directory: the student's folder; FileNotFoundError if it lacks either file.

    Raises:
        ValueError: a file is damaged (the message names it).
    """
    from safetensors.torch import load_file

    from ..assets import verify
    from .export.card import verify_card_files

    path = Path(directory)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CARD_NAME).is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME} and {CARD_NAME}")
    verify(path)
    card = json.loads((path / CARD_NAME).read_text(encoding="utf-8"))
    verify_card_files(path, card)
    config = DistillConfig(**card["config"])
    model = Student(card["data"]["dim"], config.hidden, config.depth, config.time_features, config.num_train_timesteps)
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return LoadedStudent(model.eval().requires_grad_(False), card)
