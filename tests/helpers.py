"""Shared pieces of the test suite: a deterministic stand-in model, loop runners, and a float64 reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def toy_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    """A deterministic stand-in for a network: mostly ``x`` (as a real ε-model at high noise), a smooth nonlinearity,
    and a fixed per-item pattern seeded by ``t`` (a scalar, or a batch of equal timesteps). Each batch item's output
    depends on that item alone."""
    t = int(torch.as_tensor(t).reshape(-1)[0])
    g = torch.Generator().manual_seed(1000 + t)
    pattern = torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float64)
    xd = x.double()
    return (0.8 * xd + 0.1 * torch.tanh(xd) * math.cos(t / 300) + 0.4 * pattern).to(x.dtype)


def golden_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    """diffusers' own dummy model ``x·t/(t+1)``."""
    return x * t / (t + 1)


def golden_sample() -> torch.Tensor:
    """diffusers' dummy sample: ``arange(768)/768`` reshaped to (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    return (torch.arange(768, dtype=torch.float32) / 768).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def make_generator(seed: int | Sequence[int] | None) -> torch.Generator | list[torch.Generator] | None:
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(s) for s in seed]


def run_loop(
    scheduler: Any,
    sample: torch.Tensor,
    eta: float,
    seed: int | Sequence[int] | None = 0,
    model: Callable[[torch.Tensor, Any], torch.Tensor] = toy_model,
    begin_index: int | None = None,
    record: bool = False,
) -> Any:
    """Run a full sampling loop over ``scheduler.timesteps`` (from ``begin_index`` if given)."""
    generator = make_generator(seed)
    timesteps = scheduler.timesteps
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
        timesteps = timesteps[begin_index:]
    x = sample
    steps = []
    for t in timesteps:
        out = scheduler.step(model(x, t), t, x, eta=eta, generator=generator)
        steps.append(out)
        x = out.prev_sample
    return (x, steps) if record else x


def reference_loop64(
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    sample: torch.Tensor,
    eta: float,
    prediction_type: str = "epsilon",
    noises: Sequence[torch.Tensor] | None = None,
    model: Callable[[torch.Tensor, Any], torch.Tensor] = toy_model,
) -> torch.Tensor:
    """The TCD step (step.py's module docstring) written out naively in float64, the model evaluated in float64 too.

    ``noises[i]`` is the ``z`` of step ``i`` (None entries where no noise is drawn)."""
    acp = alphas_cumprod.double()
    x = sample.double()
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        s = int(np.floor(np.float32(1 - eta) * np.float32(t_prev)))
        m = model(x, t).double()
        a_t, b_t = acp[t].sqrt(), (1 - acp[t]).sqrt()
        if prediction_type == "epsilon":
            x0, eps = (x - b_t * m) / a_t, m
        elif prediction_type == "sample":
            x0, eps = m, (x - a_t * m) / b_t
        else:
            x0, eps = a_t * x - b_t * m, a_t * m + b_t * x
        x_s = acp[s].sqrt() * x0 + (1 - acp[s]).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            r = acp[t_prev] / acp[s]
            x = r.sqrt() * x_s + (1 - r).sqrt() * noises[i].double()
        else:
            x = x_s
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|``."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def half_precision_errors(
    scheduler_cls: Any, dtype: torch.dtype, steps: int, eta: float, prediction_type: str, seed: int = 0
) -> float:
    """``max|x − x64| / max|x64|`` of a full loop run in ``dtype`` against the float64 reference, same noise."""
    sched = scheduler_cls(prediction_type=prediction_type)
    sched.set_timesteps(steps)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(100 + seed))
    out = run_loop(sched, x.to(dtype), eta, seed)
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x.shape, generator=g, dtype=dtype) for _ in range(steps - 1)] if eta > 0 else None
    ref = reference_loop64(sched.alphas_cumprod, sched.timesteps.tolist(), x.double(), eta, prediction_type, noises)
    return rel_err(out, ref)


def lcm_loops(ours: Any, ref: Any, steps: int = 4, eta: float | None = 1.0, scale: float = 1.0) -> tuple[Any, Any]:
    """Our scheduler (at ``eta``) and an ``LCMScheduler`` over the same ``steps``-step loop, same noise and generator
    seeds; returns both final samples."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = y = scale * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        x = ours.step(toy_model(x, t), t, x, eta=eta, generator=g1).prev_sample
        y = ref.step(toy_model(y, t), t, y, generator=g2).prev_sample
    return x, y
