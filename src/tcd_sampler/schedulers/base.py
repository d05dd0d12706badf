"""The base of both scheduler classes: the one ``step()`` template, the step counter and the step noise.

A scheduler subclasses :class:`SchedulerBase` and provides ``_apply_config`` (see
:mod:`tcd_sampler.schedulers.configuring`), its schedule (``timesteps`` and ``_timesteps_host``, the same values
as Python numbers) and ``_compute``, the step's math on one row; its ``step`` validates what is its own and calls
:meth:`SchedulerBase._take_step`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..core.checks import check_float_tensor, check_generator, check_int
from ..core.step import draw_noise
from ..core.table import StepTable
from .configuring import ConfigurableScheduler

logger = logging.getLogger("tcd_sampler")

__all__ = ["SchedulerBase"]


class StepNoise:
    """The generator a step draws its noise from: the one passed, :attr:`generator`, or a :attr:`noise_seed` one."""

    #: The generator ``step`` draws its noise from when it is given none. Default None.
    generator: torch.Generator | list[torch.Generator] | None = None
    _noise_seed: int | None = None
    _seeded_generator: torch.Generator | None = None
    _warned_global_rng: bool = False

    @property
    def noise_seed(self) -> int | None:
        """A seed for the step noise of every loop: when set, each ``set_timesteps`` (each pipeline call) starts a
        fresh CPU generator from it, used when ``step`` is given no generator and :attr:`generator` is None. This is
        what makes pipelines that never pass their generator to ``step`` (SD3, FLUX) reproducible:
        ``pipe.scheduler.noise_seed = 0``. Default None."""
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, seed: int | None) -> None:
        self._noise_seed = None if seed is None else check_int("noise_seed", seed, 0)
        self._restart_noise()

    def _restart_noise(self) -> None:
        """A new loop: the seeded generator starts again, and the global-RNG warning may fire once more."""
        self._seeded_generator = None if self._noise_seed is None else torch.Generator().manual_seed(self._noise_seed)
        self._warned_global_rng = False

    def _noise_generator(self, generator: Any) -> Any:
        """The generator a step that draws noise uses: the one passed, else :attr:`generator`, else the
        :attr:`noise_seed` one; with none of them, torch's global RNG, with one warning per loop."""
        if generator is not None:
            return generator
        if self.generator is not None:
            return self.generator
        if self._seeded_generator is not None:
            return self._seeded_generator
        if not self._warned_global_rng:
            self._warned_global_rng = True
            logger.warning(
                "%s.step draws its noise from torch's global RNG (no generator given), so results are not "
                "reproducible; pass generator= to step, or set scheduler.noise_seed = <int> (pipelines that do not "
                "pass their generator to step, like SD3 and FLUX, need this)",
                type(self).__name__,
            )
        return None


class SchedulerBase(StepNoise, ConfigurableScheduler):
    """The step template, the step counter and the schedule bookkeeping both schedulers share."""

    order: ClassVar[int] = 1
    init_noise_sigma: float = 1.0
    _timesteps_host: tuple[float, ...]
    _step_index: int | None
    _begin_index: int | None

    _timesteps: torch.Tensor

    @property
    def timesteps(self) -> torch.Tensor:
        """The loop's timesteps, on the device given to ``set_timesteps`` (``TCDScheduler``: descending ``int64``
        grid points; ``FlowMatchTCDScheduler``: float32 ``σ·T``). Assigning them sets a custom schedule: everything
        the step reads follows, and the next step starts a new loop."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: torch.Tensor | Sequence[float]) -> None:
        self._assign_timesteps(value)

    def _assign_timesteps(self, value: Any) -> None:  # pragma: no cover - every scheduler defines it
        raise NotImplementedError

    def _new_loop(self, keep_begin_index: bool = True) -> None:
        """A new schedule: the next step starts a new loop (at ``begin_index`` only where it is kept) and the step
        noise starts again."""
        self._step_index = None
        if not keep_begin_index:
            self._begin_index = None
        self._restart_noise()

    def _take_step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any,
        table: StepTable,
        return_dict: bool,
    ) -> Any:
        """The rest of every ``step`` once its inputs are checked and its table chosen: advance the counter (checking
        ``timestep``), draw the noise where the row needs it, and let :meth:`_compute` take the step and form the
        output."""
        i = self._advance(timestep, len(table))
        row = table.rows[i]
        noise = None
        if row.draws_noise:
            chosen = self._noise_generator(generator)
            check_generator(chosen, sample.shape[0] if sample.ndim else 1)
            noise = draw_noise(model_output.shape, chosen, model_output.device, self._noise_dtype(model_output, sample))
        return self._compute(model_output, sample, table, i, row, noise, return_dict)

    def _noise_dtype(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.dtype:
        """The dtype ``z`` is drawn in (the reference's: that of the step's inputs)."""
        return torch.promote_types(model_output.dtype, sample.dtype)

    #: The step's math on one row, ``(model_output, sample, table, index, row, noise, return_dict) → output``:
    #: each scheduler defines it.
    _compute: Callable[..., Any]

    @property
    def step_index(self) -> int | None:
        """Index of the next step in ``timesteps``; None until the first ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, if a pipeline set it with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` (pipelines call this for img2img)."""
        self._begin_index = check_int("begin_index", begin_index, 0)

    def index_for_timestep(self, timestep: int | float | torch.Tensor) -> int:
        """Position of ``timestep`` in the schedule; ``ValueError`` if it is not there."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        value = float(timestep)
        for i, t in enumerate(self._timesteps_host):
            if t == value:
                return i
        raise ValueError(f"timestep {timestep} is not in the schedule {list(self._timesteps_host)}")

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: TCD feeds the model the unscaled sample. Kept for interchangeability."""
        return sample

    def _schedule_position(self, timestep: Any) -> int | None:
        """The position in ``self.timesteps`` of a timestep that is a view of it (what a loop over
        ``scheduler.timesteps``, or a slice of it, hands back), read from the view's storage offset: no device value
        is read. None for anything else."""
        schedule = self._timesteps
        if (
            isinstance(timestep, torch.Tensor)
            and timestep.ndim == 0
            and timestep.device == schedule.device
            and timestep.dtype == schedule.dtype
            and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
        ):
            offset = int(timestep.storage_offset()) - int(schedule.storage_offset())
            index, rest = divmod(offset, schedule.stride(0)) if schedule.stride(0) else (-1, 1)
            if rest == 0 and 0 <= index < len(schedule):
                return int(index)
        return None

    def _start_index(self, timestep: Any) -> int:
        """The step index a loop starts from: ``begin_index`` if a pipeline set it, else the timestep's position
        (:meth:`_schedule_position` for a view of the schedule; anything else is looked up by value, which reads it
        once: a host sync for a device tensor)."""
        if self._begin_index is not None:
            return self._begin_index
        position = self._schedule_position(timestep)
        return self.index_for_timestep(timestep) if position is None else position

    def _check_timestep(self, timestep: Any, index: int) -> None:
        """Raise if ``timestep`` is not the schedule's timestep at ``index``, wherever that is known without reading
        a device value: a Python or numpy number, a CPU tensor, a view of the schedule."""
        expected = self._timesteps_host[index]
        if isinstance(timestep, torch.Tensor):
            schedule = self._timesteps
            if (  # the common case, a loop over the schedule: the view at this index (no device read)
                timestep.ndim == 0
                and timestep.dtype == schedule.dtype
                and timestep.data_ptr() == schedule.data_ptr() + index * schedule.stride(0) * schedule.element_size()
            ):
                return
            position = self._schedule_position(timestep)
            if position is not None:
                ok = position == index
                given: Any = self._timesteps_host[position]
            elif timestep.device.type == "cpu" and timestep.numel():
                ok = bool((timestep == expected).all())
                given = timestep.reshape(-1)[0].item() if timestep.numel() == 1 else timestep.tolist()
            else:
                return  # a device tensor: reading it would sync; its position was checked on the first step
        else:
            given = timestep
            ok = float(timestep) == expected
        if not ok:
            raise ValueError(
                f"step got timestep {given}, but step {index} of the schedule is at {expected}: steps must follow "
                "scheduler.timesteps in order (set_timesteps starts a new loop, set_begin_index a loop inside it)"
            )

    @staticmethod
    def _check_step_inputs(model_output: Any, timestep: Any, sample: Any, generator: Any = None) -> None:
        """``step``'s arguments: floating-point tensors of one shape; a number or tensor timestep; a generator, or
        one per batch item."""
        if (  # the common case, checked in a few attribute reads
            type(model_output) is torch.Tensor
            and type(sample) is torch.Tensor
            and type(timestep) in (torch.Tensor, int)
            and (generator is None or type(generator) is torch.Generator)
            and model_output.is_floating_point()
            and sample.is_floating_point()
            and model_output.shape == sample.shape
        ):
            return
        check_float_tensor("model_output", model_output)
        check_float_tensor("sample", sample)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output and sample must have the same shape, got {tuple(model_output.shape)} and "
                f"{tuple(sample.shape)}"
            )
        if isinstance(timestep, (bool, np.bool_)) or not isinstance(
            timestep, (int, float, np.integer, np.floating, torch.Tensor)
        ):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__} {timestep!r}")
        check_generator(generator, sample.shape[0] if sample.ndim else 1)

    def _advance(self, timestep: Any, steps: int) -> int:
        """The index of the step being taken (``steps`` in the schedule); checks ``timestep`` against it (see
        :meth:`_check_timestep`) and moves the counter past it."""
        if self._step_index is None:
            self._step_index = self._start_index(timestep)
        i = self._step_index
        if i >= steps:
            raise ValueError(
                f"step was called {i + 1} times but the schedule has {steps} steps; call set_timesteps again "
                "before a new loop"
            )
        self._check_timestep(timestep, i)
        self._step_index = i + 1
        return i

    def _init_step_index(self, timestep: Any) -> None:
        """Place the counter at ``timestep`` (diffusers' private hook, which some pipelines call)."""
        self._step_index = self._start_index(timestep)

    def __len__(self) -> int:
        return int(self._config["num_train_timesteps"])
