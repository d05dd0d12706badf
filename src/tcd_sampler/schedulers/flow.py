"""``FlowMatchTCDScheduler``: TCD sampling for flow-matching models (SD3, FLUX, …), diffusers-compatible.

The config keys and ``set_timesteps`` semantics are those of diffusers' ``FlowMatchEulerDiscreteScheduler`` (static
``shift``, dynamic shifting with ``mu``, ``shift_terminal``, ``invert_sigmas``, Karras/exponential/beta sigmas), so a
flow pipeline's scheduler config loads as is. The step is TCD's on the path ``x = (1 − σ)·x0 + σ·ε`` with the model
predicting the velocity ``u = ε − x0``: ``gamma = 0`` is exactly the Euler step, ``gamma = 1`` is diffusers'
``stochastic_sampling=True``, and values in between trade detail against accumulated error as in the TCD paper.

Flow pipelines call ``step(noise_pred, t, latents, return_dict=False)`` with neither a generator nor a gamma, so
``gamma`` comes from the config and the generator can be set on the scheduler (``scheduler.generator = g``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.checks import check_number, check_values
from ..core.flow_schedules import flow_sigmas, loop_sigmas, mu_for, time_shift
from ..core.paths import RectifiedFlow
from ..core.predictions import FLOW
from ..core.step import _as, flow_x0, tcd_step
from ..core.table import StepRow, StepTable, build_table
from .base import SchedulerBase
from .configuring import record_explicit_keys
from .forward import FlowForwardProcess
from .output import FlowMatchTCDSchedulerOutput
from .validation import check_flow_config

__all__ = ["FlowMatchTCDScheduler", "FlowMatchTCDSchedulerOutput"]


class FlowMatchTCDScheduler(SchedulerBase, FlowForwardProcess):
    """TCD's Strategic Stochastic Sampling on the rectified-flow path, a drop-in for
    ``FlowMatchEulerDiscreteScheduler``.

    Args:
        num_train_timesteps: T; timesteps are ``σ·T``. Default 1000.
        shift: static time shift ``σ ← shift·σ / (1 + (shift − 1)·σ)`` (SD3: 3.0), finite and > 0. Default 1.0.
        use_dynamic_shifting: shift by ``mu`` given to ``set_timesteps`` instead (FLUX: resolution dependent).
            Default False.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: the pipeline's inputs for ``mu``
            (:meth:`mu_for` computes it): finite numbers (or None) and integers ≥ 1. Defaults 0.5, 1.15, 256, 4096.
        invert_sigmas: the model's sigmas run from 0 (noise) to 1 (data); the step works on ``1 − σ``. Default False.
        shift_terminal: stretch the shifted schedule so that it ends at this sigma. Default None.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: respace the sigmas (at most one; beta needs
            scipy). Default False.
        time_shift_type: ``"exponential"`` (default) or ``"linear"`` form of the dynamic shift.
        stochastic_sampling: diffusers' name for ``gamma = 1``; when True it means ``gamma = 1`` (passing both it and
            a ``gamma`` other than 1 is an error). From someone else's config (a ``FlowMatchEulerDiscreteScheduler``
            config that has it), it is kept but not applied unless passed explicitly, and an explicit ``gamma``
            always wins over it (an INFO log line says so). Default False.
        gamma: TCD's stochasticity in [0, 1]: 0 is the Euler step, 1 is fully stochastic (consistency) sampling.
            ``step(gamma=…)`` overrides it for one call. Default 0.3.

    Flow pipelines never pass a generator to ``step``: set :attr:`noise_seed` (one line,
    ``pipe.scheduler.noise_seed = 0``) for reproducible images, or :attr:`generator`.
    """

    _guarded_keys = ("stochastic_sampling",)
    _overridden_by = {"stochastic_sampling": "gamma"}  # noqa: RUF012 - a ClassVar of the base
    _family = "flow"
    _other_family = "TCDScheduler"
    _reference = "the gamma this scheduler is given"

    @record_explicit_keys
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        gamma: float = 0.3,
    ) -> None:
        if stochastic_sampling is True and gamma != 1.0 and {"stochastic_sampling", "gamma"} <= self._caller_keys():
            raise ValueError(
                f"stochastic_sampling=True means gamma=1, but gamma={gamma} was passed too; pass one of them"
            )
        self._init_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})

    # ------------------------------------------------------------------ config

    def _apply_config(self, config: Mapping[str, Any]) -> None:
        c, active = self._settle(config)
        check_flow_config(c)
        self._config = c
        self._active = active
        self._shift = float(c["shift"])
        T = int(c["num_train_timesteps"])
        sigmas = flow_sigmas(T, None if c["use_dynamic_shifting"] else self._shift)
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.num_inference_steps: int | None = None
        self._set_schedule(sigmas * T, torch.cat([sigmas, torch.zeros(1)]))
        self._step_index = None
        self._begin_index = None
        self._path = RectifiedFlow()

    @property
    def shift(self) -> float:
        """The static shift in use (``set_shift`` changes it without touching the config, as in diffusers)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Use another static shift from the next ``set_timesteps`` on."""
        self._shift = check_number("shift", shift, 0.0, math.inf, low_open=True)

    @property
    def gamma(self) -> float:
        """The stochasticity a ``step`` without ``gamma`` uses: 1 with ``stochastic_sampling``, else the config's."""
        return 1.0 if self._active["stochastic_sampling"] else float(self._config["gamma"])

    def mu_for(self, image_seq_len: int) -> float:
        """The dynamic shift ``mu`` for a latent of ``image_seq_len`` tokens, interpolated linearly between
        ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` as the FLUX pipelines do."""
        c = self._config
        unset = [name for name in ("base_shift", "max_shift") if c[name] is None]
        if unset:
            raise ValueError(f"mu_for needs {' and '.join(unset)} in the config (None there)")
        return mu_for(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """The dynamic shift of times ``t`` by ``mu`` (``time_shift_type`` form)."""
        return time_shift(mu, sigma, t, self._config["time_shift_type"])

    # ---------------------------------------------------------------- schedule

    def _set_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self._timesteps = timesteps
        self._sigmas = sigmas
        self._timesteps_host = tuple(timesteps.tolist())
        self._sigmas_host = tuple(sigmas.tolist())
        self._tables: dict[float, StepTable] = {}

    def _assign_timesteps(self, value: torch.Tensor | Sequence[float]) -> None:
        """Assigning timesteps sets the sigmas to ``timesteps / T`` (ending at the clean end): everything the step
        reads follows, and the next step starts a new loop."""
        t = torch.as_tensor(value, dtype=torch.float32).clone()  # never alias the caller's tensor
        T = float(self._config["num_train_timesteps"])
        check_values("timesteps", t.cpu().numpy(), 0.0, T, descending=not self._config["invert_sigmas"])
        end = torch.ones(1) if self._config["invert_sigmas"] else torch.zeros(1)
        self._replace_schedule(t, torch.cat([t.cpu() / T, end]).to(t.device))

    @property
    def sigmas(self) -> torch.Tensor:
        """The loop's sigmas, one more than the timesteps (the last is the clean end: 0, or 1 with
        ``invert_sigmas``)."""
        return self._sigmas

    @sigmas.setter
    def sigmas(self, value: torch.Tensor | Sequence[float]) -> None:
        """Assigning sigmas (with the clean end, as :attr:`sigmas` holds them) sets the timesteps to ``σ·T``."""
        sig = torch.as_tensor(value, dtype=torch.float32).clone()
        check_values("sigmas", sig.cpu().numpy(), 0.0, 1.0, descending=not self._config["invert_sigmas"])
        if len(sig) < 2:
            raise ValueError("sigmas must hold at least one step and the clean end")
        self._replace_schedule(sig[:-1] * self._config["num_train_timesteps"], sig)

    def _replace_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self._set_schedule(timesteps, sigmas)
        self.num_inference_steps = len(timesteps)
        self._new_loop()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Set the sigmas and timesteps of the loop, as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` does.

        Args:
            num_inference_steps: number of model calls; may be left out when ``sigmas`` or ``timesteps`` are given.
            device: where ``timesteps`` and ``sigmas`` are put. Default: CPU.
            sigmas: custom descending sigmas in (0, 1] before shifting (pipelines pass ``linspace(1, 1/N, N)``).
            mu: the dynamic shift; required with ``use_dynamic_shifting`` (see :meth:`mu_for`).
            timesteps: custom timesteps (``σ·T``); without ``sigmas`` they also define the sigmas.
        """
        c = self._config
        T = c["num_train_timesteps"]
        ends = (self.sigma_max, self.sigma_min)
        n, given_t, sig = loop_sigmas(c, self._shift, ends, num_inference_steps, sigmas, mu, timesteps)
        sig_t = torch.from_numpy(np.asarray(sig)).to(dtype=torch.float32, device=device)
        ts = torch.from_numpy(given_t).to(dtype=torch.float32, device=device) if given_t is not None else sig_t * T
        end = torch.zeros(1, device=sig_t.device)
        if c["invert_sigmas"]:
            sig_t = 1.0 - sig_t
            ts = sig_t * T
            end = torch.ones(1, device=sig_t.device)
        self._set_schedule(ts, torch.cat([sig_t, end]))
        self.num_inference_steps = n
        self._new_loop(keep_begin_index=False)

    # -------------------------------------------------------------------- step

    def step_table(self, gamma: float | None = None) -> StepTable:
        """Per-step coefficients of the current schedule for ``gamma`` (default: :attr:`gamma`), cached."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        gamma = self.gamma if gamma is None else check_number("gamma", gamma, 0.0, 1.0)
        table = self._tables.get(gamma)
        if table is None:
            levels = np.asarray(self._sigmas_host, dtype=np.float64)
            if self._config["invert_sigmas"]:
                levels = 1.0 - levels  # the noise level of an inverted schedule
            table = build_table(self._path, levels, gamma)  # the schedule ends at noise level 0
            self._tables[gamma] = table
        return table

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        gamma: float | None = None,
    ) -> FlowMatchTCDSchedulerOutput | tuple[torch.Tensor]:
        """One TCD step on the flow path from ``sample`` at ``timestep`` with the model's velocity ``model_output``.

        The signature is ``FlowMatchEulerDiscreteScheduler.step``'s, so calls written for it work unchanged.

        Args:
            model_output: the velocity ``u = ε − x0`` predicted at ``(sample, timestep)``.
            timestep: the current timestep (one of ``self.timesteps``); read on the first step of a loop.
            sample: the current latents (computed in float32, returned in ``model_output``'s dtype, as diffusers).
            s_churn, s_tmin, s_tmax, s_noise: accepted for compatibility; diffusers' flow scheduler does not use
                them either, and values other than their defaults are an error (TCD's stochasticity is ``gamma``).
            generator: for the noise; default :attr:`generator`, else the :attr:`noise_seed` one.
            per_token_timesteps: per-token timesteps (LTX-Video conditioning); not supported, an error if given.
            return_dict: return a :class:`FlowMatchTCDSchedulerOutput` (default) or ``(prev_sample,)``.
            gamma: override the configured stochasticity for this call.
        """
        if (s_churn, s_tmin, s_tmax, s_noise) != (0.0, 0.0, float("inf"), 1.0):
            raise ValueError(
                "s_churn, s_tmin, s_tmax and s_noise have no effect on a flow-matching step (diffusers ignores them "
                f"too), got {(s_churn, s_tmin, s_tmax, s_noise)}; TCD's stochasticity is gamma"
            )
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchTCDScheduler does not support per_token_timesteps")
        self._check_step_inputs(model_output, timestep, sample, generator)
        return self._take_step(model_output, timestep, sample, generator, self.step_table(gamma), return_dict)

    def _noise_dtype(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.dtype:
        """The step computes in float32 (as diffusers' flow schedulers), and draws ``z`` in it."""
        return torch.float32

    def _compute(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        table: StepTable,
        index: int,
        row: StepRow,
        noise: torch.Tensor | None,
        return_dict: bool,
    ) -> FlowMatchTCDSchedulerOutput | tuple[torch.Tensor]:
        velocity = -model_output if self._config["invert_sigmas"] else model_output
        x, u = _as(sample, torch.float32), _as(velocity, torch.float32)
        prev, x_s, _ = tcd_step(u, x, row, FLOW, noise)
        dtype = model_output.dtype
        if not return_dict:
            return (_as(prev, dtype),)
        x0 = _as(flow_x0(u, x, row.sigma_t), dtype)  # now, from the inputs as they are: the caller may reuse them
        out: FlowMatchTCDSchedulerOutput = FlowMatchTCDSchedulerOutput._of((_as(prev, dtype),), x0, (_as(x_s, dtype),))
        return out
