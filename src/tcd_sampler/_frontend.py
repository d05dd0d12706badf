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
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from .config import (
    APPLIED_KEY,
    CONFIG_NAME,
    OWN_MARK,
    UNAPPLIED_KEY,
    FrozenConfig,
    config_family,
    config_to_json,
    is_own_config,
    load_config_file,
    package_version,
    split_config,
)

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


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor``; None where torch keeps none (inference-mode tensors)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def lazy_tensor(
    compute: Callable[[], torch.Tensor], *inputs: torch.Tensor
) -> torch.Tensor | Callable[[], torch.Tensor]:
    """``compute`` deferred until first read, guarded against the caller changing ``inputs`` in the meantime.

    The deferred value is computed from ``inputs`` later, so it would be wrong if they were modified in place first
    (a loop that writes the next latents into the same tensor). Their version counters are recorded now and checked
    on read, which raises instead. Where no change could be seen (tensors made under ``torch.inference_mode``, which
    keep no version counter, or while a CUDA graph is being captured), the value is computed now. Writes that torch
    does not count (through ``.data``, a numpy or DLPack view, a CUDA graph replay into the same memory) are not
    seen: this is used only on the opt-in ``fused_step`` path, whose docs say to read ``pred_original_sample``
    before reusing the inputs that way."""
    try:
        versions = tuple(t._version for t in inputs)
    except RuntimeError:  # inference-mode tensors keep no version counter
        return compute()
    if _cuda_available() and torch.cuda.is_current_stream_capturing():
        return compute()

    def checked() -> torch.Tensor:
        if tuple(_version(t) for t in inputs) != versions:
            raise RuntimeError(
                "pred_original_sample is computed on first read from step's inputs, which have been modified in "
                "place since; read it before changing model_output or sample (or use fused_step=False)"
            )
        return compute()

    return checked


class StepOutput(dict[str, torch.Tensor]):
    """What a scheduler's ``step`` returns, shaped like diffusers' ``BaseOutput``: an (insertion-ordered) mapping of the
    reference's fields (``keys()``, ``values()``, ``out["prev_sample"]``), indexable like its tuple form
    (``out[0]``, ``to_tuple()``, what ``step(..., return_dict=False)`` returns), each field also an attribute.

    ``pred_original_sample`` (``x̂0``) is an extra attribute, not a key (the reference's outputs have none): it can be
    read and assigned, and where the step itself did not need it, it is computed on first read."""

    #: The reference's fields: the keys and the tuple form.
    _FIELDS: ClassVar[tuple[str, ...]] = ("prev_sample", "pred_noised_sample")
    #: Further attributes, besides ``pred_original_sample``, that are not keys.
    _EXTRAS: ClassVar[tuple[str, ...]] = ()
    _x0: torch.Tensor | Callable[[], torch.Tensor] | None

    def __init__(self, *values: Any, pred_original_sample: Any = None, **named: Any) -> None:
        fields, extras = self._FIELDS, self._EXTRAS
        if len(values) == 1 and isinstance(values[0], Mapping):  # type(out)({k: v, ...}), as BaseOutput takes
            named = {**values[0], **named}
            values = ()
        if len(values) < len(fields):
            values = (*values, *(named.pop(k) for k in fields[len(values) :] if k in named))
        unknown = [k for k in named if k not in extras]
        if len(values) != len(fields) or unknown:
            given = sorted([*fields[: len(values)], *named])
            raise TypeError(f"{type(self).__name__} takes the fields {fields + extras}, got {given}")
        dict.__init__(self, zip(fields, values, strict=True))
        attributes = self.__dict__  # the fields live in the mapping only, read through __getattr__
        attributes["_x0"] = pred_original_sample
        for key in extras:
            attributes[key] = named.get(key)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register each output class as a pytree node, as diffusers does for ``BaseOutput`` (``tree_map``,
        ``send_to_device`` and DDP see the tensors inside)."""
        super().__init_subclass__(**kwargs)
        import torch.utils._pytree as pytree

        def flatten(out: StepOutput) -> tuple[list[Any], Any]:
            names = (*cls._FIELDS, *cls._EXTRAS)
            return [*(getattr(out, k) for k in names), out.__dict__["_x0"]], names

        def unflatten(values: Any, names: Any) -> StepOutput:
            *tensors, x0 = list(values)
            return cls(**dict(zip(names, tensors, strict=True)), pred_original_sample=x0)

        pytree.register_pytree_node(
            cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}"
        )

    def __getattr__(self, name: str) -> Any:
        if name in self._FIELDS:
            return dict.__getitem__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """``x̂0`` (after clipping/thresholding and the boundary condition, where configured)."""
        if callable(self._x0) and not isinstance(self._x0, torch.Tensor):
            self.__dict__["_x0"] = self._x0()
        return self._x0  # type: ignore[return-value]

    @pred_original_sample.setter
    def pred_original_sample(self, value: torch.Tensor) -> None:
        self.__dict__["_x0"] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIELDS:
            dict.__setitem__(self, name, value)
        elif name == "pred_original_sample":
            self.__dict__["_x0"] = value
        else:  # further attributes, as on diffusers' outputs (InvokeAI sets ``denoised`` on some)
            self.__dict__[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._FIELDS:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are {self._FIELDS}")
        dict.__setitem__(self, key, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _frozen(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"the fields of a {type(self).__name__} can be assigned, not added or removed")

    __delitem__ = pop = popitem = setdefault = update = clear = _frozen

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The tuple form of the output (the values of ``keys()``)."""
        return tuple(dict.__getitem__(self, k) for k in self._FIELDS)

    def __reduce__(self) -> Any:
        extras = {k: v for k, v in self.__dict__.items() if k != "_x0"}
        x0: Any
        try:
            x0 = self.pred_original_sample
        except RuntimeError:  # its inputs changed since the step: the copy raises too, when read
            x0 = _STALE
        return (_rebuild_output, (type(self), self.to_tuple(), x0, extras))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._FIELDS)}; {', '.join((*self._EXTRAS, 'pred_original_sample'))})"


class _StaleX0:
    """The deferred ``x̂0`` of a copied output whose inputs had changed: reading it raises, as on the original."""

    def __call__(self) -> torch.Tensor:
        raise RuntimeError(
            "pred_original_sample of this copied step output was deferred, and the step's inputs were modified in "
            "place before the copy; read it before changing model_output or sample"
        )


_STALE = _StaleX0()


def _rebuild_output(
    cls: type[StepOutput], values: tuple[torch.Tensor, ...], x0: Any, attributes: dict[str, Any]
) -> StepOutput:
    out = cls(*values, pred_original_sample=x0, **{k: v for k, v in attributes.items() if k in cls._EXTRAS})
    for key, value in attributes.items():
        if key not in cls._EXTRAS:
            out.__dict__[key] = value
    return out


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

    #: Parameters whose effect here would move the results away from the reference's when their value comes from
    #: someone else's config (diffusers' TCDScheduler ignores them; SD/SDXL configs carry ``steps_offset=1``).
    #: Such a value is kept in the config but not applied (listed under ``_tcd_sampler_unapplied``) unless the
    #: caller passes the key explicitly or a config this package wrote records applying that very value
    #: (``_tcd_sampler_applied``).
    _guarded_keys: ClassVar[tuple[str, ...]] = ()
    #: A guarded key whose effect an explicitly passed parameter replaces (key → that parameter).
    _overridden_by: ClassVar[dict[str, str]] = {}
    #: The family of configs this class takes (:func:`config_family`), and the class to use for the other one.
    _family: ClassVar[str] = "vp"
    _other_family: ClassVar[str] = ""

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {k: p.default for k, p in cls._signature().items()}

    def _init_config(self, config: dict[str, Any]) -> None:
        """Apply the constructor's arguments, noting which ones took their defaults (``_use_default_values``), plus
        what :meth:`from_config` hands over besides them (kept keys, unapplied values), in one pass."""
        explicit = getattr(self, "_explicit_keys", set(config))
        used = [k for k in config if k not in explicit]
        handed = self.__dict__.pop("_handoff", None)
        if handed is not None:
            kept, later, carried, _ = handed
            used = [k for k in used if k not in later] + carried
            config = {**config, **kept, **later, UNAPPLIED_KEY: sorted(later)}
        self._apply_config({**config, "_use_default_values": used})

    def _caller_keys(self) -> set[str]:
        """In a constructor: the parameters its caller passed explicitly (for :meth:`from_config`, the overrides
        only, not the keys of the config)."""
        handed = self.__dict__.get("_handoff")
        return set(handed[3]) if handed is not None else set(getattr(self, "_explicit_keys", ()))

    def _settle(self, config: Mapping[str, Any]) -> tuple[FrozenConfig, FrozenConfig]:
        """The stored config (missing parameters take their defaults, marked as ours) and the active one, in which
        the unapplied guarded keys have their defaults: the former is what ``config`` shows and saves, the latter
        what the scheduler does."""
        defaults = self._defaults()
        c = {**defaults, **config}
        c.pop(APPLIED_KEY, None)
        listed = c.pop(UNAPPLIED_KEY, None) or ()
        if isinstance(listed, str) or not all(k in self._guarded_keys for k in listed):
            raise ValueError(f"{UNAPPLIED_KEY} must list keys of {self._guarded_keys}, got {listed!r}")
        unapplied = sorted(k for k in set(listed) if c[k] != defaults[k])  # a default value changes nothing
        if unapplied:
            c[UNAPPLIED_KEY] = unapplied
            used = [k for k in c.get("_use_default_values", ()) if k not in unapplied]
            if "_use_default_values" in c:
                c["_use_default_values"] = used
        applied = {k: c[k] for k in self._guarded_keys if c[k] != defaults[k] and k not in unapplied}
        if applied:
            c[APPLIED_KEY] = applied
        c[OWN_MARK] = package_version()
        return FrozenConfig(c), FrozenConfig({**c, **{k: defaults[k] for k in unapplied}})

    @classmethod
    def _signature(cls) -> dict[str, inspect.Parameter]:
        return dict(_init_parameters(cls.__init__))

    @property
    def config(self) -> FrozenConfig:
        """The read-only configuration (key and attribute access).

        It keeps every key it was given, also those of another scheduler's config and guarded values that are not
        applied (listed under ``_tcd_sampler_unapplied``), so converting back to that scheduler loses nothing."""
        return self._config

    def __getattr__(self, name: str) -> Any:
        """Config keys as attributes (``scheduler.prediction_type``), deprecated as in diffusers: a FutureWarning."""
        config = self.__dict__.get("_config")
        if config is not None and not name.startswith("_") and name in config:
            warnings.warn(
                f"reading the config key {name!r} as an attribute of {type(self).__name__} is deprecated (as in "
                f"diffusers); read scheduler.config.{name} instead",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def _internal_dict(self) -> FrozenConfig:
        """diffusers' name for the config. Only diffusers itself assigns it: pipelines replace it to patch legacy
        configs, e.g. the Stable Diffusion pipelines force ``steps_offset=1`` and ``clip_sample=False`` into any
        scheduler. A replacement is someone else's config: a guarded key it changes is kept but not applied, and an
        applied non-default value of one (which the caller chose) is not replaced; every other key is taken."""
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, value: Mapping[str, Any]) -> None:
        current, defaults = self._config, self._defaults()
        unapplied = set(current.get(UNAPPLIED_KEY, ()))
        merged = dict(value)
        declined, ignored = {}, {}
        for key in self._guarded_keys:
            if key not in value:  # a partial replacement leaves the guarded keys it does not name as they are
                merged[key] = current[key]
                continue
            if value[key] == current[key]:
                continue
            if key not in unapplied and current[key] != defaults[key]:
                merged[key] = current[key]
                declined[key] = value[key]
            else:
                unapplied.add(key)
                ignored[key] = value[key]
        if declined or ignored:
            logger.info(
                "%s: a replaced config (a diffusers pipeline's legacy patch) asked for %s; keeping %s and not "
                "applying the rest, so results do not move; use register_to_config to change them",
                type(self).__name__,
                {**declined, **ignored},
                {k: current[k] for k in declined} or "the results",
            )
        changed = {*declined, *ignored, *(k for k in self._guarded_keys if k not in value)}
        used = [k for k in merged.get("_use_default_values", ()) if k not in changed]
        self._apply_config({**merged, UNAPPLIED_KEY: sorted(unapplied), "_use_default_values": used})

    def register_to_config(self, **kwargs: Any) -> None:
        """Update config keys (diffusers' API); the schedule is rebuilt and must be set again. The keys given are
        explicit, so they are applied."""
        unapplied = self._still_unapplied(self._config.get(UNAPPLIED_KEY, ()), self._config, kwargs)
        used = [k for k in self._config.get("_use_default_values", ()) if k not in kwargs]
        self._apply_config({**self._config, **kwargs, UNAPPLIED_KEY: unapplied, "_use_default_values": used})

    @classmethod
    def _still_unapplied(cls, candidates: Any, config: Mapping[str, Any], explicit: Mapping[str, Any]) -> list[str]:
        """The guarded keys of ``config`` that stay unapplied given the ``explicit`` parameters: the candidates not
        passed explicitly, plus those whose effect an explicit parameter replaces (:attr:`_overridden_by`)."""
        keys = {k for k in candidates if k not in explicit}
        keys |= {k for k, by in cls._overridden_by.items() if by in explicit and k not in explicit}
        defaults = cls._defaults()
        return sorted(k for k in keys if k in config and config[k] != defaults[k])

    @classmethod
    def _check_family(cls, config: Mapping[str, Any]) -> None:
        family = config_family(config)
        if family is not None and family != cls._family:
            kind = "a flow-matching" if family == "flow" else "a discrete-time (beta schedule)"
            source = config.get("_class_name", "this")
            raise ValueError(
                f"{source} config is {kind} scheduler config, which {cls.__name__} cannot run; use "
                f"{cls._other_family}.from_config(config) instead"
            )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Self | tuple[Self, dict[str, Any]]:
        """Build a scheduler from a config mapping, e.g. ``pipe.scheduler.config`` of any diffusers scheduler.

        Args:
            config: a scheduler config (diffusers' or ours). Keys listed in its ``_use_default_values`` take our
                defaults; keys we do not know are kept in our config, so converting back loses nothing. In a config
                this package did not write, the guarded keys (see the class docs) are kept but not applied, so the
                results stay the reference's; an INFO log line names them.
            return_unused_kwargs: return ``(scheduler, unused)`` where ``unused`` holds the ``kwargs`` that are not
                constructor parameters, instead of rejecting them. Default False.
            **kwargs: constructor parameters overriding the config; they are always applied.
        """
        params = cls._signature()
        init, extras = split_config(config, params, cls.__name__)
        cls._check_family(config)
        unused = {k: v for k, v in kwargs.items() if k not in params}
        if unused and not return_unused_kwargs:
            raise TypeError(
                f"{cls.__name__}.from_config got unknown parameters {sorted(unused)}; accepted: {sorted(params)}"
            )
        overrides = {k: v for k, v in kwargs.items() if k in params}
        # a guarded key is ours (applied) only where a config of ours recorded applying this very value
        applied = (config.get(APPLIED_KEY) or {}) if is_own_config(config) else {}
        candidates = [k for k in cls._guarded_keys if not (k in applied and applied[k] == init.get(k))]
        candidates = [k for k in candidates if k not in cls._live_in_reference({**init, **overrides})]
        unapplied = cls._still_unapplied(candidates, init, overrides)
        for key in (UNAPPLIED_KEY, APPLIED_KEY, OWN_MARK):
            extras.pop(key, None)
        later = {k: init[k] for k in unapplied}  # kept in the config, but the constructor does not see them
        # another scheduler's keys that its config marked as defaults stay marked (so converting back gives that
        # scheduler its defaults, not fixed choices)
        carried = [k for k in config.get("_use_default_values", ()) if k in extras]
        scheduler = cls.__new__(cls)
        scheduler.__dict__["_handoff"] = (extras, later, carried, tuple(overrides))  # read by _init_config
        scheduler.__init__(**{k: v for k, v in {**init, **overrides}.items() if k not in later})  # type: ignore[misc]
        if unapplied:
            given = ", ".join(f"{k}={init[k]!r}" for k in unapplied)
            logger.info(
                "%s: not applying %s from the %s config, which would move the results away from %s; pass %s "
                "explicitly (%s.from_config(config, %s)) to apply %s",
                cls.__name__,
                given,
                config.get("_class_name", "given"),
                cls._reference,
                "it" if len(unapplied) == 1 else "them",
                cls.__name__,
                given,
                "it" if len(unapplied) == 1 else "them",
            )
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def _live_in_reference(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
        """Guarded keys that the reference of this configuration does apply (so they are not guarded in it)."""
        return ()

    #: What results a guarded key would move away from (for the log line of :meth:`from_config`).
    _reference: ClassVar[str] = "the reference's"

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
        # what diffusers' loaders pass to every component; a scheduler config has no variant or dtype
        for key in ("variant", "torch_dtype", "dtype", "user_agent", "use_safetensors", "low_cpu_mem_usage"):
            kwargs.pop(key, None)
        if kwargs.pop("dduf_entries", None):
            raise NotImplementedError(f"{cls.__name__}.from_pretrained cannot read DDUF archives; unpack it first")
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

    def _schedule_position(self, timestep: Any) -> int | None:
        """The position in ``self.timesteps`` of a timestep that is a view of it (what a loop over
        ``scheduler.timesteps``, or a slice of it, hands back), read from the view's storage offset: no device value
        is read. None for anything else."""
        schedule: torch.Tensor = getattr(self, "timesteps")  # noqa: B009 - defined by the subclasses
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
            schedule: torch.Tensor = getattr(self, "timesteps")  # noqa: B009 - defined by the subclasses
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
            and generator is None
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

    # ------------------------------------------------------------- step noise

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

    def __len__(self) -> int:
        return int(self._config["num_train_timesteps"])
