"""Config plumbing of the diffusers-compatible schedulers: ``config``, ``_internal_dict``, ``register_to_config``,
``from_config``, ``from_pretrained``, ``save_pretrained``, and the rule for keys from someone else's config (the
guarded keys, see :attr:`GuardedConfig._guarded_keys`).

A scheduler decorates its ``__init__`` with :func:`record_explicit_keys`, passes its arguments to ``_init_config``
and implements ``_apply_config(config)``, which validates a full config, builds its path and resets its schedule.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

from .config_file import (
    APPLIED_KEY,
    CONFIG_NAME,
    OWN_MARK,
    UNAPPLIED_KEY,
    ConfigFiles,
    FrozenConfig,
    config_family,
    is_own_config,
    package_version,
    split_config,
)

logger = logging.getLogger("tcd_sampler")

__all__ = ["ConfigurableScheduler", "GuardedConfig", "record_explicit_keys"]


def record_explicit_keys(init: Any) -> Any:
    """Let ``__init__`` know which parameters the caller passed, for the config's ``_use_default_values``."""

    names = [n for n in inspect.signature(init).parameters if n != "self"]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        self._explicit_keys = set(names[: len(args)]) | set(kwargs)
        init(self, *args, **kwargs)

    return wrapper


@functools.cache
def _init_parameters(init: Callable[..., None]) -> tuple[tuple[str, inspect.Parameter], ...]:
    """The constructor's parameters, less ``self`` (inspect is slow; constructors are not)."""
    return tuple((k, p) for k, p in inspect.signature(init).parameters.items() if k != "self")


class GuardedConfig:
    """The configuration of a scheduler and the rule for keys from someone else's config (see the module docstring)."""

    _config: FrozenConfig

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


class ConfigurableScheduler(ConfigFiles, GuardedConfig):
    """Building, loading and saving a scheduler from and to diffusers' config format."""

    config_name: ClassVar[str] = CONFIG_NAME

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

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes that can be built from this one's config."""
        return [type(self)]
