"""Teachers and students from diffusers: the network ``(x_t, t) → m`` of a ``UNet2DConditionModel`` (SD1.5, SD2.1,
SDXL with its added conditions) or a ``UNet2DModel`` (unconditional or class-conditional) under a condition, and the
path and prediction type of its scheduler config. diffusers is not imported here: the adapters call the module they
are given."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.paths import VPDiscrete
from ..core.predictions import PREDICTION_TYPES
from ..core.schedules import make_betas, rescale_zero_terminal_snr

__all__ = ["Conditioning", "network", "teacher_path"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Conditioning:
    """What a diffusers UNet is conditioned on, per sample (batch first).

    Attributes:
        encoder_hidden_states: the text embeddings ``(B, tokens, dim)`` of a ``UNet2DConditionModel``; None for a
            ``UNet2DModel``.
        added_cond_kwargs: SDXL's added conditions (``text_embeds`` ``(B, pooled)``, ``time_ids`` ``(B, 6)``); empty
            for SD1.5/SD2.1.
        class_labels: class labels ``(B,)`` of a class-conditional UNet; None otherwise.
    """

    encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    class_labels: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The conditioning with ``fn`` applied to every tensor (slicing, moving, casting)."""
        return Conditioning(
            None if self.encoder_hidden_states is None else fn(self.encoder_hidden_states),
            {k: fn(v) for k, v in self.added_cond_kwargs.items()},
            None if self.class_labels is None else fn(self.class_labels),
        )


_TAKES_TEXT: dict[type, bool] = {}


def _takes_text(cls: type) -> bool:
    """Whether a UNet class's forward takes text embeddings (``UNet2DConditionModel``; a ``UNet2DModel`` does not);
    inspected once per class, since the trainer builds four models a step."""
    if cls not in _TAKES_TEXT:
        _TAKES_TEXT[cls] = "encoder_hidden_states" in inspect.signature(getattr(cls, "forward")).parameters  # noqa: B009
    return _TAKES_TEXT[cls]


def network(unet: Any, cond: Conditioning) -> Model:
    """The model ``(x_t, t) → m`` of a diffusers UNet under ``cond`` (its ``.sample`` output, in ``x_t``'s dtype's
    working precision as the UNet returns it)."""
    inner = getattr(unet, "module", unet)  # a DistributedDataParallel wrapper forwards to its module
    kwargs: dict[str, Any] = {}
    if _takes_text(type(inner)):
        if cond.encoder_hidden_states is None:
            raise ValueError(f"{type(inner).__name__} needs encoder_hidden_states (text embeddings) to be conditioned")
        kwargs["encoder_hidden_states"] = cond.encoder_hidden_states
        if cond.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, return_dict=False, **kwargs)[0]

    return model


def teacher_path(scheduler_config: Mapping[str, Any]) -> tuple[VPDiscrete, str]:
    """The discrete VP path and prediction type of a teacher's scheduler config (a diffusers ``scheduler_config.json``
    mapping: betas from ``beta_schedule``/``beta_start``/``beta_end``/``trained_betas``, ``rescale_betas_zero_snr``).
    ValueError for a flow-matching config or a prediction type TCD does not know."""
    c = dict(scheduler_config)
    if "shift" in c or "use_dynamic_shifting" in c:
        raise ValueError(
            "a flow-matching teacher is not supported by this trainer yet (its scheduler config has shift)"
        )
    if c.get("sigma_data") is not None:  # EDM schedulers' (discrete schedulers may carry sigma_min/max: None)
        raise ValueError("an EDM teacher (its scheduler config has sigma_data) is not supported by this trainer yet")
    prediction_type = str(c.get("prediction_type", "epsilon"))
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the teacher's prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    T = int(c.get("num_train_timesteps", 1000))
    betas = make_betas(T, float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012)),
                       str(c.get("beta_schedule", "scaled_linear")), c.get("trained_betas"))  # fmt: skip
    if c.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return VPDiscrete.from_betas(betas), prediction_type
