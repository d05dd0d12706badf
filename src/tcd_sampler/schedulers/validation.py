"""The checks of a whole scheduler config, run once whenever a config is applied (constructor, ``from_config``,
``register_to_config``, ``_internal_dict``): every key named with its accepted range, before anything is built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.checks import check_bool, check_choice, check_int, check_number
from ..core.flow_schedules import RESPACINGS, TIME_SHIFT_TYPES
from ..core.predictions import PREDICTION_TYPES
from ..core.schedules import BETA_SCHEDULES, TIMESTEP_SPACINGS, make_betas, rescale_zero_terminal_snr

__all__ = ["check_flow_config", "vp_betas"]

_VP_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "consistency_boundary",
             "fused_step")  # fmt: skip
_FLOW_FLAGS = ("use_dynamic_shifting", "invert_sigmas", *RESPACINGS, "stochastic_sampling")


def vp_betas(c: Mapping[str, Any]) -> torch.Tensor:
    """Check a ``TCDScheduler`` config and return its betas (zero-SNR rescaled where asked)."""
    for name in _VP_FLAGS:
        check_bool(name, c[name])
    T = check_int("num_train_timesteps", c["num_train_timesteps"], 1)
    check_choice("prediction_type", c["prediction_type"], PREDICTION_TYPES)
    check_choice("timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)
    check_int("original_inference_steps", c["original_inference_steps"], 1, T)
    check_int("steps_offset", c["steps_offset"], 0, T - 1)
    for name in ("clip_sample_range", "sample_max_value", "timestep_scaling"):
        check_number(name, c[name], 0.0, math.inf, low_open=True)
    check_number("dynamic_thresholding_ratio", c["dynamic_thresholding_ratio"], 0.0, 1.0)
    check_number("eta", c["eta"], 0.0, 1.0)
    if c["trained_betas"] is None:
        check_choice("beta_schedule", c["beta_schedule"], BETA_SCHEDULES)
        check_number("beta_start", c["beta_start"], 0.0, 1.0)
        check_number("beta_end", c["beta_end"], 0.0, 1.0)
    betas = make_betas(T, c["beta_start"], c["beta_end"], c["beta_schedule"], c["trained_betas"])
    if betas.ndim != 1 or betas.shape[0] != T:
        raise ValueError(f"trained_betas must have length num_train_timesteps={T}, got shape {tuple(betas.shape)}")
    if not bool(torch.all((betas >= 0) & (betas <= 1))):
        raise ValueError("trained_betas must all lie in [0, 1]")
    return rescale_zero_terminal_snr(betas) if c["rescale_betas_zero_snr"] else betas


def check_flow_config(c: Mapping[str, Any]) -> None:
    """Check a ``FlowMatchTCDScheduler`` config."""
    check_int("num_train_timesteps", c["num_train_timesteps"], 1)
    check_number("shift", c["shift"], 0.0, math.inf, low_open=True)
    for name in ("base_shift", "max_shift"):  # None as in diffusers' signature; a pipeline then uses its default
        if c[name] is not None:
            check_number(name, c[name], -math.inf, math.inf)
    for name in ("base_image_seq_len", "max_image_seq_len"):
        check_int(name, c[name], 1)
    for name in _FLOW_FLAGS:
        check_bool(name, c[name])
    check_choice("time_shift_type", c["time_shift_type"], TIME_SHIFT_TYPES)
    check_number("gamma", c["gamma"], 0.0, 1.0)
    if c["shift_terminal"] is not None:
        terminal = check_number("shift_terminal", c["shift_terminal"], 0.0, 1.0, low_open=True)
        if terminal == 1.0:
            raise ValueError("shift_terminal must be in (0, 1): at 1 every sigma but the last is 1")
    if sum(bool(c[k]) for k in RESPACINGS) > 1:
        raise ValueError(f"use at most one of {', '.join(RESPACINGS)}")
