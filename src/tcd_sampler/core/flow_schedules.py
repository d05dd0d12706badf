"""The flow sigma pipeline of diffusers' ``FlowMatchEulerDiscreteScheduler`` as pure functions (like k-diffusion's
``get_sigmas_*``): the training sigmas, the static and the dynamic (``mu``) shift, the terminal stretch, Karras /
exponential / beta respacing, and :func:`loop_sigmas`, which chains them as its ``set_timesteps`` does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .checks import check_int, check_number, check_values

__all__ = [
    "RESPACINGS",
    "TIME_SHIFT_TYPES",
    "flow_sigmas",
    "loop_sigmas",
    "mu_for",
    "respace_sigmas",
    "shift_sigmas",
    "stretch_to_terminal",
    "time_shift",
]

#: Forms of the dynamic shift (``time_shift_type``).
TIME_SHIFT_TYPES = ("exponential", "linear")

#: Respacings of flow sigmas, by the config key that turns each on.
RESPACINGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}


def flow_sigmas(num_train_timesteps: int, shift: float | None) -> torch.Tensor:
    """The training sigmas ``σ_i = i/T`` (float32, descending from 1), shifted statically unless ``shift`` is None
    (dynamic shifting shifts at ``set_timesteps``), as ``FlowMatchEulerDiscreteScheduler`` builds them."""
    T = num_train_timesteps
    sigmas = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    return sigmas if shift is None else shift_sigmas(sigmas, shift)


def shift_sigmas(sigmas: Any, shift: float) -> Any:
    """The static time shift ``σ ← shift·σ / (1 + (shift − 1)·σ)`` (SD3: shift 3)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def mu_for(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The dynamic shift ``mu`` for ``image_seq_len`` tokens: linear between ``(base_seq_len, base_shift)`` and
    ``(max_seq_len, max_shift)``, as the FLUX pipelines compute it."""
    if max_seq_len == base_seq_len:
        raise ValueError("mu_for needs max_image_seq_len != base_image_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(mu: float, sigma: float, t: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """The dynamic shift of times ``t`` by ``mu``: ``e^mu / (e^mu + (1/t − 1)^sigma)`` (``"exponential"``) or
    ``mu / (mu + (1/t − 1)^sigma)`` (``"linear"``)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return mu / (mu + (1 / t - 1) ** sigma)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch ``1 − σ`` so that the schedule ends at ``terminal`` (``shift_terminal``)."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def respace_sigmas(kind: str, n: int, low: float, high: float) -> np.ndarray:
    """``n`` sigmas from ``high`` down to ``low``: ``"karras"`` (ρ = 7), ``"exponential"`` (log-linear) or ``"beta"``
    (the Beta(0.6, 0.6) quantiles; needs scipy)."""
    if kind == "karras":
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(high), math.log(low), n))
    try:
        from scipy.stats import beta
    except ImportError:
        raise ImportError("use_beta_sigmas needs scipy: pip install scipy") from None
    return np.array([low + ppf * (high - low) for ppf in (beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n))])


def loop_sigmas(
    config: Any,
    shift: float,
    ends: tuple[float, float],
    num_inference_steps: int | None = None,
    sigmas: Sequence[float] | np.ndarray | None = None,
    mu: float | None = None,
    timesteps: Sequence[float] | np.ndarray | None = None,
) -> tuple[int, np.ndarray | None, np.ndarray]:
    """The sigmas of a loop (before ``invert_sigmas``), checked, as ``FlowMatchEulerDiscreteScheduler.set_timesteps``
    computes them: base sigmas (given, from given timesteps, or spread between the training schedule's ``ends``
    ``(σ_max, σ_min)``), shifted (static ``shift`` or dynamic ``mu``), stretched to ``shift_terminal``, respaced.

    Returns ``(N, the given timesteps or None, the sigmas)``; ``config`` is the scheduler's config mapping.
    """
    c = config
    T = c["num_train_timesteps"]
    if c["use_dynamic_shifting"] and mu is None:
        raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True (see mu_for)")
    if mu is not None:
        check_number("mu", mu, -math.inf, math.inf)
    if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
        raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
    if num_inference_steps is None:
        if sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)  # type: ignore[arg-type]
    else:
        check_int("num_inference_steps", num_inference_steps, 1)
        for name, given in (("sigmas", sigmas), ("timesteps", timesteps)):
            if given is not None and len(given) != num_inference_steps:
                raise ValueError(f"{name} must have num_inference_steps={num_inference_steps} entries")
    given_t = None if timesteps is None else check_values("timesteps", timesteps, 0.0, float(T))
    if sigmas is None:
        base = given_t if given_t is not None else np.linspace(ends[0] * T, ends[1] * T, num_inference_steps)
        sig = base / T
    else:
        sig = check_values("sigmas", sigmas, 0.0, 1.0)
    if c["use_dynamic_shifting"]:
        sig = time_shift(float(mu), 1.0, sig, c["time_shift_type"])  # type: ignore[arg-type]
    else:
        sig = shift_sigmas(sig, shift)
    if c["shift_terminal"]:
        sig = stretch_to_terminal(sig, c["shift_terminal"])
    kind = next((name for key, name in RESPACINGS.items() if c[key]), None)
    if kind is not None:
        low = float(c["sigma_min"]) if c.get("sigma_min") is not None else float(sig[-1])
        high = float(c["sigma_max"]) if c.get("sigma_max") is not None else float(sig[0])
        sig = respace_sigmas(kind, num_inference_steps, low, high)
    return num_inference_steps, given_t, np.asarray(sig)
