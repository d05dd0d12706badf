"""Scheduler configs in diffusers' ``scheduler_config.json`` format, without importing diffusers.

A config is a read-only mapping (:class:`FrozenConfig`) with attribute access. Its keys are the constructor's
parameters, plus private bookkeeping keys (``_class_name``, ``_diffusers_version``, ``_use_default_values``) and any
keys of other schedulers' configs it was built from, which are kept so that converting back loses nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Self

import numpy as np

__all__ = [
    "APPLIED_KEY",
    "CONFIG_NAME",
    "OWN_MARK",
    "UNAPPLIED_KEY",
    "FrozenConfig",
    "config_family",
    "config_to_json",
    "is_own_config",
    "load_config_file",
    "split_config",
]

logger = logging.getLogger("tcd_sampler")

#: File name of a saved scheduler config, as in diffusers.
CONFIG_NAME = "scheduler_config.json"

#: The diffusers release whose config format and numbers this package reproduces.
REFERENCE_DIFFUSERS_VERSION = "0.42.1"

#: Private key that marks a config this package wrote (its value: the package version). diffusers' ``TCDScheduler``
#: and ours share a class name, so the mark is what tells a saved config of ours from one of diffusers'.
OWN_MARK = "_tcd_sampler_version"

#: Private key listing the keys whose values a config keeps but does not apply (they came from someone else's
#: config; see ``SchedulerFrontend``).
UNAPPLIED_KEY = "_tcd_sampler_unapplied"

#: Private key recording the guarded values a scheduler of ours applied (key → value). A config that went through
#: another scheduler keeps our private keys, so a guarded key counts as ours only while its value is still the one
#: recorded here.
APPLIED_KEY = "_tcd_sampler_applied"

#: Class-name fragments of diffusers' flow-matching schedulers.
_FLOW_CLASSES = ("FlowMatch",)

#: Keys only discrete-VP (beta-schedule) configs carry.
_VP_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")

#: Keys only flow-matching configs carry (a config built in memory has no ``_class_name``).
_FLOW_KEYS = ("use_dynamic_shifting", "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal",
              "time_shift_type", "stochastic_sampling")  # fmt: skip


@functools.cache
def package_version() -> str:
    """This package's version: the installed distribution's, else the package's ``__version__`` (a source tree
    that is not installed)."""
    try:
        return metadata.version("tcd-sampler")
    except metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def is_own_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` was written by this package (it carries :data:`OWN_MARK`)."""
    return OWN_MARK in config


def config_family(config: Mapping[str, Any]) -> str | None:
    """``"flow"`` for a flow-matching scheduler config, ``"vp"`` for a discrete VP (beta-schedule) one, None when
    the config does not say (no class name and none of the tell-tale keys)."""
    name = str(config.get("_class_name", ""))
    if (
        any(f in name for f in _FLOW_CLASSES)
        or config.get("use_flow_sigmas")
        or (config.get("prediction_type") == "flow_prediction")
    ):
        return "flow"
    if any(k in config for k in _VP_KEYS):
        return "vp"
    if any(k in config for k in _FLOW_KEYS):
        return "flow"
    return None


class FrozenConfig(dict):
    """A read-only ``dict`` with attribute access (``config.num_train_timesteps``), like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "scheduler configs are read-only; build a new scheduler with "
            "`Scheduler.from_config(scheduler.config, key=value)` or call `register_to_config(key=value)`"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _readonly
    update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]

    def __ior__(self, other: Any) -> FrozenConfig:  # type: ignore[misc]
        self._readonly()
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenConfig, (dict(self),))


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return REFERENCE_DIFFUSERS_VERSION


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars, tensors
        return value.tolist()
    return value


def config_to_json(config: Mapping[str, Any], class_name: str) -> str:
    """Serialize as diffusers does: ``_class_name`` and ``_diffusers_version`` set, ``_use_default_values`` dropped,
    keys sorted, two-space indent, trailing newline."""
    out = {k: _json_value(v) for k, v in config.items() if k != "_use_default_values"}
    out["_class_name"] = class_name
    out["_diffusers_version"] = _diffusers_version()
    out[OWN_MARK] = package_version()
    return json.dumps(out, indent=2, sort_keys=True) + "\n"


def load_config_file(
    pretrained_model_name_or_path: str | os.PathLike[str],
    subfolder: str | None = None,
    name: str = CONFIG_NAME,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """Read a JSON config (``name``, by default ``scheduler_config.json``) from a folder (optionally its
    ``subfolder``), a JSON file, or a Hub repo.

    Hub repos need ``huggingface_hub`` (installed with diffusers) and network access; ``hub_kwargs`` (``revision``,
    ``cache_dir``, ``token``, ``local_files_only`` …) go to ``hf_hub_download``.
    """
    path = Path(pretrained_model_name_or_path)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        path = path / name
    if path.is_file():
        return _read_json(path)
    given = str(pretrained_model_name_or_path)
    if Path(pretrained_model_name_or_path).exists():
        raise FileNotFoundError(f"no {name} at {path}")
    if looks_local(given):
        raise FileNotFoundError(f"{given} does not exist (a local path: neither a folder nor a JSON file)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(
            f"{pretrained_model_name_or_path!r} is not a local folder or file, and loading from the Hugging Face Hub "
            "needs `huggingface_hub` (pip install 'tcd-sampler[diffusers]')"
        ) from None
    file = hf_hub_download(str(pretrained_model_name_or_path), name, subfolder=subfolder, **hub_kwargs)
    return _read_json(Path(file))


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path, not a Hub repo id (``org/name``): absolute, starting with ``.``
    or ``~``, a ``.json`` file, or more than one ``/``."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.endswith(".json") or name.count("/") > 1


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def split_config(
    config: Mapping[str, Any], parameters: Iterable[str], class_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config into constructor arguments and the keys to keep alongside them.

    Keys listed in the config's ``_use_default_values`` are dropped, so our defaults apply to them, as diffusers
    does. Unknown keys are kept (returned as extras): a warning names them when the config claims to be ours (or
    names no class), since there they are probably typos; another scheduler's keys (``use_karras_sigmas``,
    ``interpolation_type`` …) are expected and only logged at DEBUG level. Private keys other than
    ``_use_default_values`` are kept, with ``_class_name`` rewritten to ours.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (e.g. `scheduler.config`), got {type(config).__name__}")
    params = set(parameters)
    defaults = set(config.get("_use_default_values", ()))
    init: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in config.items():
        if key == "_use_default_values":
            continue
        if key in params:
            if key not in defaults:
                init[key] = value
        else:
            extras[key] = value
    source = config.get("_class_name", class_name)
    if "_class_name" in extras:
        extras["_class_name"] = class_name
    unknown = sorted(k for k in extras if not k.startswith("_"))
    if unknown:
        if source == class_name:
            logger.warning(
                "config keys %s are not parameters of %s; they are kept but have no effect", unknown, class_name
            )
        else:
            logger.debug("keeping %s keys %s that %s does not use", source, unknown, class_name)
    return init, extras


class ConfigFiles:
    """Loading and saving a scheduler as ``scheduler_config.json`` (a mixin of the scheduler base)."""

    _config: FrozenConfig

    @classmethod
    def from_config(cls, config: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - the scheduler base defines it

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
