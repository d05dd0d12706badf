"""``TCDScheduler``: a drop-in, stateful, diffusers-compatible front end over the pure TCD core.

It holds the configuration, the schedule and the step counter, validates input at the boundary
(constructor, ``set_timesteps``, the first ``step``), and delegates the math to :mod:`tcd_sampler.core`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from ..core.checks import check_number
from ..core.fused import LinearRow, fold_row, fused_x0, linear_step
from ..core.paths import VPDiscrete
from ..core.schedules import custom_schedule, vp_timesteps
from ..core.step import GeneratorLike, clip_x0, dynamic_threshold_x0, tcd_step, working_dtype
from ..core.table import Boundary, StepRow, StepTable, build_table
from .base import SchedulerBase
from .configuring import record_explicit_keys
from .forward import VPForwardProcess
from .output import TCDSchedulerOutput, lazy_tensor
from .validation import vp_betas

__all__ = ["TCDScheduler", "TCDSchedulerOutput"]

#: The default of the ``eta`` config key: what ``step`` uses when it gets ``eta=None``.
DEFAULT_ETA = 0.3


class TCDScheduler(SchedulerBase, VPForwardProcess):
    """Strategic Stochastic Sampling of *Trajectory Consistency Distillation* (Zheng et al. 2024, Algorithm 4).

    A drop-in replacement for diffusers' ``TCDScheduler``: same constructor, config files, ``set_timesteps`` and
    ``step`` signatures, and the same numbers in the default configuration, given the same ``torch.Generator``.
    Unlike the reference, every parameter below has an effect.

    **Keys from someone else's config.** ``steps_offset``, ``set_alpha_to_one``, ``timestep_spacing``,
    ``clip_sample`` and ``thresholding`` do nothing in diffusers' ``TCDScheduler`` (and ``set_alpha_to_one`` nothing in
    its ``LCMScheduler``, which does clip and threshold, so those two apply in the consistency-boundary mode), and
    stock configs carry values of them meant for other schedulers (SD/SDXL:
    ``steps_offset=1``; SD1.5: ``set_alpha_to_one=False``). So they take effect only when passed explicitly (to the
    constructor, ``from_config(config, key=value)`` or ``register_to_config``) or when they come from a config this
    package saved. Otherwise the value is kept in ``config`` (and listed under ``_tcd_sampler_unapplied``) but the
    scheduler behaves as the reference, and an INFO log line says so:
    ``TCDScheduler.from_config(pipe.scheduler.config)`` gives diffusers' TCD numbers for every SD/SDXL model. This
    holds for the constructor, ``from_config``, ``from_pretrained`` and the pipelines' replacement of
    ``_internal_dict``.

    Args:
        num_train_timesteps: T, the number of timesteps the model was trained with. Default 1000.
        beta_start: first beta of the ``linear``/``scaled_linear`` schedules. Default 0.00085.
        beta_end: last beta of those schedules. Default 0.012.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` (default, Stable Diffusion) or ``"squaredcos_cap_v2"``.
        trained_betas: explicit betas of length T, overriding the named schedule. Default None.
        original_inference_steps: N_orig, the size of the distillation grid ``{k·i − 1}``, ``k = T // N_orig``, that
            inference timesteps are taken from. Default 50.
        clip_sample: clamp ``x̂0`` to ``[−clip_sample_range, clip_sample_range]`` before ``x_s`` is formed; ``ε̂`` is
            then recomputed from the clipped ``x̂0`` (DDIM's convention). Default False.
        clip_sample_range: the clamp bound of ``clip_sample``. Default 1.0.
        set_alpha_to_one: in the consistency-boundary mode, whether the clean endpoint (a target ``s = 0``) has
            ``ᾱ = 1`` (True) or ``ᾱ_0``; plain TCD always targets ``ᾱ_0`` at ``s = 0``, as the reference. Default True.
        steps_offset: shifts every point of the schedule grid up by this many timesteps (clamped to ``T − 1``), as
            diffusers' DDIM does for ``leading`` spacing (not with ``trailing``). Default 0.
        prediction_type: what the model predicts: ``"epsilon"`` (default), ``"sample"`` or ``"v_prediction"``.
        thresholding: dynamic thresholding of ``x̂0`` (Imagen) before ``x_s`` is formed; takes precedence over
            ``clip_sample``. Unsuitable for latent models. Default False.
        dynamic_thresholding_ratio: the quantile of ``|x̂0|`` used as the threshold. Default 0.995.
        sample_max_value: upper bound of the dynamic threshold. Default 1.0.
        timestep_spacing: how ``num_inference_steps`` timesteps are taken: ``"leading"`` (default) takes indices
            ``⌊i·len/n⌋`` of the distillation grid from the top (TCD's selection); ``"trailing"`` is DDIM's trailing
            selection on the full grid (``[999, 749, 499, 249]`` for 4 steps, what Draw Things calls "TCD
            Trailing"); ``"linspace"`` spreads them evenly over the distillation grid with both ends included.
        timestep_scaling: ``k`` in the consistency boundary condition of the consistency-boundary mode,
            ``c_skip = σ_d²/((k·t)² + σ_d²)``, ``c_out = k·t/√((k·t)² + σ_d²)``, ``σ_d = 0.5``; not used by plain
            TCD. Default 10.0.
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2023); use with
            ``v_prediction`` or ``sample`` models, since ``epsilon`` cannot recover ``x̂0`` where ``ᾱ = 0``.
            Default False.
        consistency_boundary: the consistency-boundary mode for LCM-distilled models: ``x̂0`` becomes
            ``c_out·x̂0 + c_skip·x_t`` (after clipping/thresholding), ``ε̂`` is recomputed from it, and a target
            ``s = 0`` is the clean endpoint with ``ᾱ = final_alpha_cumprod``. With ``eta = 1`` this is diffusers'
            ``LCMScheduler``; ``eta < 1`` gives LCM models TCD's control. Not a diffusers parameter. Default False.
        eta: the stochasticity ``step`` uses when it is called with ``eta=None`` or without ``eta``, e.g. by the LCM
            pipelines, which cannot pass one. Not a diffusers parameter. Default 0.3.
        fused_step: compute each step as at most two fused passes with coefficients folded in float64 (about 2×
            faster on small latents) instead of the reference's operation order. As close to a float64 reference,
            but no longer bit-identical to diffusers (≈ 1e-6 relative per loop, up to a few 1e-6 over 50 steps).
            Ignored while clipping or thresholding is on. Not a diffusers parameter. Default False.
    """

    _guarded_keys = ("steps_offset", "set_alpha_to_one", "timestep_spacing", "clip_sample", "thresholding")
    _other_family = "FlowMatchTCDScheduler"
    _reference = "diffusers' TCDScheduler (and LCMScheduler in the consistency-boundary mode)"

    @classmethod
    def _live_in_reference(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
        """In the consistency-boundary mode the reference is ``LCMScheduler``, which clips and thresholds."""
        return ("clip_sample", "thresholding") if config.get("consistency_boundary") else ()

    @record_explicit_keys
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | Sequence[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        consistency_boundary: bool = False,
        eta: float = DEFAULT_ETA,
        fused_step: bool = False,
    ) -> None:
        self._init_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})

    # ------------------------------------------------------------------ config

    def _apply_config(self, config: Mapping[str, Any]) -> None:
        """Validate a config (missing parameters take their defaults), build the path, and reset the schedule."""
        c, active = self._settle(config)
        betas = vp_betas(c)
        T = int(c["num_train_timesteps"])
        self._config = c
        self._active = active
        self._path = VPDiscrete.from_betas(betas)
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self._path.alphas_cumprod
        self.final_alpha_cumprod = torch.tensor(1.0) if active["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._zero_snr_timesteps = frozenset(np.flatnonzero(self.alphas_cumprod.numpy() == 0).tolist())
        self._x0_transform = self._make_x0_transform()
        self._fused = bool(c["fused_step"]) and self._x0_transform is None
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(T - 1, -1, -1, dtype=np.int64), None)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _make_x0_transform(self) -> Any:
        c = self._active
        if c["thresholding"]:
            return partial(dynamic_threshold_x0, ratio=c["dynamic_thresholding_ratio"], max_value=c["sample_max_value"])
        if c["clip_sample"]:
            return partial(clip_x0, clip_range=c["clip_sample_range"])
        return None

    # ---------------------------------------------------------------- schedule

    def _set_schedule(self, timesteps: np.ndarray, device: torch.device | str | None) -> None:
        on_device = torch.from_numpy(np.asarray(timesteps, dtype=np.int64)).to(device)  # first: it may fail
        self._timesteps_host: tuple[int, ...] = tuple(np.asarray(timesteps, dtype=np.int64).tolist())
        self._timesteps = on_device
        self._tables: dict[tuple[float, torch.dtype], StepTable] = {}
        self._requested: dict[tuple[float | None, torch.dtype], StepTable] = {}
        self._folded: dict[tuple[float, torch.dtype], tuple[LinearRow, ...]] = {}

    def _assign_timesteps(self, value: torch.Tensor | Sequence[int]) -> None:
        """Assigning timesteps is ``set_timesteps(timesteps=value)`` on the value's device: everything the step
        reads follows, and the next step starts a new loop."""
        arr = custom_schedule(torch.as_tensor(value).cpu().numpy(), self._config["num_train_timesteps"])
        device = value.device if isinstance(value, torch.Tensor) else None
        self._set_schedule(arr, device)
        self.num_inference_steps = len(arr)
        self.custom_timesteps = True
        self._new_loop()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Set the timesteps of the sampling loop (call before the loop).

        Args:
            num_inference_steps: number of model calls N; exclusive with ``timesteps``.
            device: where ``self.timesteps`` is put. Default: CPU.
            original_inference_steps: size of the distillation grid; when passed explicitly the timesteps are taken
                from the full grid ``0 … T−1`` instead (diffusers' behaviour: N = 4 gives ``[999, 749, 499, 249]``).
                Default: the config's ``original_inference_steps`` on the skip grid.
            timesteps: custom descending timesteps in ``[0, T−1]``; exclusive with ``num_inference_steps``.
                Off-grid values only warn.
            strength: the fraction of the grid used, for img2img/inpainting: the grid is cut to its lowest
                ``⌊N_orig·strength⌋`` points (custom timesteps: the last ``⌊N·strength⌋`` are kept). In ``(0, 1]``,
                default 1.0.

        With ``timestep_spacing="trailing"`` the timesteps are DDIM's trailing selection on the full grid
        (``⌊T·strength⌋`` points, ``steps_offset`` not applied): N = 4 gives ``[999, 749, 499, 249]``.
        """
        c = self._active
        full_grid = original_inference_steps is not None
        steps: Any = original_inference_steps if full_grid else c["original_inference_steps"]
        arr = vp_timesteps(c["num_train_timesteps"], num_inference_steps, timesteps, strength, steps, full_grid,
                           c["timestep_spacing"], c["steps_offset"])  # fmt: skip
        dead = [int(t) for t in arr if t in self._zero_snr_timesteps]
        if c["prediction_type"] == "epsilon" and dead:
            raise ValueError(
                "prediction_type='epsilon' cannot recover x0 where alphas_cumprod is 0 "
                f"(timestep {dead[0]}, rescale_betas_zero_snr="
                f"{c['rescale_betas_zero_snr']}); use a v_prediction/sample model or start below that timestep"
            )
        self._set_schedule(arr, device)
        self.num_inference_steps = len(arr)
        self.custom_timesteps = timesteps is not None
        self._new_loop(keep_begin_index=False)

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The timestep after ``timestep`` in the schedule (−1 after the last), or ``timestep − 1`` before
        ``set_timesteps``."""
        if self.num_inference_steps is None:
            return torch.as_tensor(timestep) - 1
        i = self.index_for_timestep(timestep)
        nxt = self._timesteps_host[i + 1] if i + 1 < len(self._timesteps_host) else -1
        return torch.tensor(nxt)

    # -------------------------------------------------------------------- step

    def step_table(self, eta: float | None = None, dtype: torch.dtype = torch.float32) -> StepTable:
        """The per-step coefficients of the current schedule for ``eta ∈ [0, 1]`` (None: the config's ``eta``) in
        the working precision of ``dtype``, built once per value and cached until the schedule changes."""
        known = self._requested.get((eta, dtype))  # a request seen before in this schedule: no checks again
        if known is not None:
            return known
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps must be called before step")
        request = (eta, dtype)
        eta = float(self._config["eta"]) if eta is None else check_number("eta", eta, 0.0, 1.0)
        work = working_dtype(dtype)
        table = self._tables.get((eta, work))
        if table is None:
            boundary = None
            if self._config["consistency_boundary"]:
                boundary = Boundary(float(self._config["timestep_scaling"]), bool(self._active["set_alpha_to_one"]))
            table = build_table(self._path, [*self._timesteps_host, 0], eta, boundary, work)
            self._tables[(eta, work)] = table
            if self._fused:
                prediction = self._config["prediction_type"]
                self._folded[(eta, work)] = tuple(fold_row(row, prediction) for row in table.rows)
        if type(request[0]) in (float, int, type(None)):  # hashable as itself (numpy scalars are looked up anew)
            self._requested[request] = table
        return table

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: GeneratorLike = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One TCD step: from ``sample = x_t`` and the model's output at ``timestep`` to ``x_t'``.

        Args:
            model_output: the model's output at ``(sample, timestep)``, interpreted by ``prediction_type``.
            timestep: the current timestep; read on the first step of a loop to find its position (unless a
                pipeline called ``set_begin_index``), after which steps follow the schedule.
            sample: ``x_t``, a floating-point tensor with the shape of ``model_output``.
            eta: ``γ ∈ [0, 1]``, the stochasticity (0: deterministic; 1: LCM's multistep sampling). ``None``
                (the default) means the config's ``eta``, 0.3 unless configured.
            generator: a ``torch.Generator`` (or one per batch item) for the noise ``z``.
            return_dict: return a :class:`TCDSchedulerOutput` (default) or the tuple
                ``(prev_sample, pred_noised_sample)``.
        """
        self._check_step_inputs(model_output, timestep, sample, generator)
        table = self.step_table(eta, torch.promote_types(model_output.dtype, sample.dtype))
        return self._take_step(model_output, timestep, sample, generator, table, return_dict)

    def _compute(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        table: StepTable,
        index: int,
        row: StepRow,
        noise: torch.Tensor | None,
        return_dict: bool,
    ) -> TCDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        if self._fused:
            lin = self._folded[(table.gamma, table.dtype)][index]
            prev, x_s = linear_step(model_output, sample, row, lin, noise)
            if not return_dict:
                return (prev, x_s)
            lazy = lazy_tensor(partial(fused_x0, model_output, sample, lin), model_output, sample)
            return TCDSchedulerOutput(prev, x_s, pred_original_sample=lazy)
        prev, x_s, x0 = tcd_step(model_output, sample, row, self._config["prediction_type"], noise, self._x0_transform)
        if not return_dict:
            return (prev, x_s)
        return TCDSchedulerOutput(prev, x_s, pred_original_sample=x0)
