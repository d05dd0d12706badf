"""What the diffusers-compatible scheduler front ends share: input validation, config plumbing (``config``,
``from_config``, ``from_pretrained``, ``save_pretrained``, ``_internal_dict``) and the step counter.

A front end subclasses :class:`SchedulerFrontend`, decorates its ``__init__`` with :func:`record_explicit_keys`, and
implements ``_apply_config(config)``, which validates a full config, builds its path and resets its schedule; it keeps
the schedule's timesteps as Python numbers in ``_timesteps_host``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from .config import CONFIG_NAME, FrozenConfig, config_to_json, load_config_file, split_config

logger = logging.getLogger("tcd_sampler")

__all__ = [
    "SchedulerFrontend",
    "StepOutput",
    "check_bool",
    "check_choice",
    "check_float_tensor",
    "check_generator",
    "check_int",
    "check_number",
    "record_explicit_keys",
]


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), else a TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = (low < v if low_open else low <= v) and v <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return v


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = "∞" if high is None else str(high)
        raise ValueError(f"{name} must be an integer in [{low}, {upper}], got {value}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return str(value)


def check_float_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` if it is a floating-point tensor, else a TypeError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def record_explicit_keys(init: Any) -> Any:
    """Let ``__init__`` know which parameters the caller passed, for the config's ``_use_default_values``."""

    names = [n for n in inspect.signature(init).parameters if n != "self"]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        self._explicit_keys = set(names[: len(args)]) | set(kwargs)
        init(self, *args, **kwargs)

    return wrapper


def check_generator(generator: Any, batch: int) -> None:
    """``generator``: None, a ``torch.Generator``, or a list/tuple of them with one per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of them")
        if len(generator) not in (1, batch):
            raise ValueError(f"a list of generators needs one per batch item ({batch}), got {len(generator)}")
        return
    raise TypeError(f"generator must be a torch.Generator, a list of them, or None; got {type(generator).__name__}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


@functools.cache
def _init_parameters(init: Callable[..., None]) -> tuple[tuple[str, inspect.Parameter], ...]:
    """The constructor's parameters, less ``self`` (inspect is slow; constructors are not)."""
    return tuple((k, p) for k, p in inspect.signature(init).parameters.items() if k != "self")


class StepOutput:
    """What a scheduler's ``step`` returns: ``prev_sample``, ``pred_noised_sample`` (``x_s``) and
    ``pred_original_sample`` (``x̂0``, computed on first read when the step itself did not need it).

    Indexing, iteration and ``len`` follow ``to_tuple()``, the form ``step(..., return_dict=False)`` returns."""

    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("prev_sample", "pred_noised_sample")

    def __init__(
        self,
        prev_sample: torch.Tensor,
        pred_noised_sample: torch.Tensor,
        pred_original_sample: torch.Tensor | Callable[[], torch.Tensor],
    ) -> None:
        self.prev_sample = prev_sample
        self.pred_noised_sample = pred_noised_sample
        self._x0 = pred_original_sample

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """``x̂0`` (after clipping/thresholding and the boundary condition, where configured)."""
        if not isinstance(self._x0, torch.Tensor):
            self._x0 = self._x0()
        return self._x0

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The tuple form of the output."""
        return tuple(getattr(self, name) for name in self._TUPLE_FIELDS)

    def keys(self) -> list[str]:
        """Field names, as on diffusers' ``BaseOutput``."""
        return ["prev_sample", "pred_noised_sample", "pred_original_sample"]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Any:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self._TUPLE_FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.keys())})"


class SchedulerFrontend:
    """Config plumbing and step bookkeeping shared by the scheduler classes (see the module docstring)."""

    order: ClassVar[int] = 1
    config_name: ClassVar[str] = CONFIG_NAME
    init_noise_sigma: float = 1.0
    _config: FrozenConfig
    _timesteps_host: tuple[float, ...]
    _step_index: int | None
    _begin_index: int | None

    def _apply_config(self, config: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self._signature().items()}

    def _init_config(self, config: dict[str, Any]) -> None:
        """Apply the constructor's arguments, noting which ones took their defaults (``_use_default_values``)."""
        explicit = getattr(self, "_explicit_keys", set(config))
        self._apply_config({**config, "_use_default_values": [k for k in config if k not in explicit]})

    @classmethod
    def _signature(cls) -> dict[str, inspect.Parameter]:
        return dict(_init_parameters(cls.__init__))

    @property
    def config(self) -> FrozenConfig:
        """The read-only configuration (key and attribute access)."""
        return self._config

    #: Keys a replacement of ``_internal_dict`` does not change (see the setter).
    _pipeline_protected_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def _internal_dict(self) -> FrozenConfig:
        """diffusers' name for the config. Only diffusers itself assigns it: pipelines replace it to patch legacy
        configs, e.g. the Stable Diffusion pipelines force ``steps_offset=1`` and ``clip_sample=False`` into any
        scheduler. Keys in ``_pipeline_protected_keys`` are parameters with a real effect here that those patches
        would silently change, so a replacement keeps their current values (change them with
        ``register_to_config`` or ``from_config``); every other key is taken."""
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, value: Mapping[str, Any]) -> None:
        kept = {k: self._config[k] for k in self._pipeline_protected_keys if k in self._config}
        declined = {k: value[k] for k in kept if k in value and value[k] != kept[k]}
        if declined:
            logger.info(
                "%s keeps %s: a replaced config (a diffusers pipeline's legacy patch) asked for %s; "
                "use register_to_config to change them",
                type(self).__name__,
                kept,
                declined,
            )
        self._apply_config({**value, **kept})

    def register_to_config(self, **kwargs: Any) -> None:
        """Update config keys (diffusers' API); the schedule is rebuilt and must be set again."""
        self._apply_config({**self._config, **kwargs})

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Self | tuple[Self, dict[str, Any]]:
        """Build a scheduler from a config mapping, e.g. ``pipe.scheduler.config`` of any diffusers scheduler.

        Args:
            config: a scheduler config (diffusers' or ours). Keys listed in its ``_use_default_values`` take our
                defaults; keys we do not know are kept in our config, so converting back loses nothing.
            return_unused_kwargs: return ``(scheduler, unused)`` where ``unused`` holds the ``kwargs`` that are not
                constructor parameters, instead of rejecting them. Default False.
            **kwargs: constructor parameters overriding the config.
        """
        params = cls._signature()
        init, extras = split_config(config, params, cls.__name__)
        unused = {k: v for k, v in kwargs.items() if k not in params}
        if unused and not return_unused_kwargs:
            raise TypeError(
                f"{cls.__name__}.from_config got unknown parameters {sorted(unused)}; accepted: {sorted(params)}"
            )
        overrides = {k: v for k, v in kwargs.items() if k in params}
        scheduler = cls(**{**init, **overrides})
        if extras:
            scheduler._apply_config({**scheduler._config, **extras})
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Self | tuple[Self, dict[str, Any]]:
        """Load ``scheduler_config.json`` from a folder (e.g. a pipeline folder with ``subfolder="scheduler"``), a
        JSON file, or a Hub repo id. Constructor parameters in ``kwargs`` override the file; the Hub options
        ``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``force_download``, ``proxies`` are passed on."""
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        config = load_config_file(pretrained_model_name_or_path, subfolder, **hub)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if missing), in diffusers' format."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported; save locally and upload with huggingface_hub")
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory must be a folder, got the file {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")

    save_config = save_pretrained

    def to_json_string(self) -> str:
        """The config as diffusers writes it (sorted keys, ``_class_name``, ``_diffusers_version``)."""
        return config_to_json(self._config, type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes that can be built from this one's config."""
        return [type(self)]

    # ---------------------------------------------------------- step counter

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

    def _start_index(self, timestep: Any) -> int:
        """The step index a loop starts from: ``begin_index`` if a pipeline set it, else the timestep's position.

        A loop over ``self.timesteps`` (or a slice of it, as img2img pipelines take) hands back views of that tensor,
        whose position is read from the view's storage offset: no device value is read. Anything else is looked up
        by value, which reads it once (a host sync for a device tensor)."""
        if self._begin_index is not None:
            return self._begin_index
        schedule = self.timesteps  # type: ignore[attr-defined]
        if (
            isinstance(timestep, torch.Tensor)
            and timestep.ndim == 0
            and timestep.device == schedule.device
            and timestep.dtype == schedule.dtype
            and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
        ):
            offset = timestep.storage_offset() - schedule.storage_offset()
            index, rest = divmod(offset, schedule.stride(0)) if schedule.stride(0) else (-1, 1)
            if rest == 0 and 0 <= index < len(schedule):
                return int(index)
        return self.index_for_timestep(timestep)

    @staticmethod
    def _check_step_inputs(model_output: Any, sample: Any, generator: Any = None) -> None:
        """``step``'s arguments: floating-point tensors of one shape; a generator, or one per batch item."""
        check_float_tensor("model_output", model_output)
        check_float_tensor("sample", sample)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output and sample must have the same shape, got {tuple(model_output.shape)} and "
                f"{tuple(sample.shape)}"
            )
        check_generator(generator, sample.shape[0] if sample.ndim else 1)

    def _advance(self, timestep: Any, steps: int) -> int:
        """The index of the step being taken (``steps`` in the schedule); moves the counter past it."""
        if self._step_index is None:
            self._step_index = self._start_index(timestep)
        i = self._step_index
        if i >= steps:
            raise ValueError(
                f"step was called {i + 1} times but the schedule has {steps} steps; call set_timesteps again "
                "before a new loop"
            )
        self._step_index = i + 1
        return i

    def __len__(self) -> int:
        return int(self._config["num_train_timesteps"])
