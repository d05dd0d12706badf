"""The card (``card.json``) that says how to sample a student: its ``scheduler`` section (:func:`scheduler_settings`)
is everything :class:`~tcd_sampler.TCDScheduler` needs, beside the run's settings, data, steps and loss curve.

Needs neither diffusers, peft nor safetensors.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._files import atomic_paths, folder_problem
from ...core.checks import check_int, check_number
from ...schedulers.vp import TCDScheduler

#: The card's file name.
CARD_NAME = "card.json"
#: The card's ``format`` entry, and the version of that format this module writes and reads.
CARD_FORMAT = "tcd-sampler-card"
CARD_FORMAT_VERSION = 1
#: The scheduler-config keys :func:`scheduler_settings` takes from the teacher's: the noise schedule and the
#: prediction type, which the student shares with its teacher. The sampling choices are the caller's.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
_SCHEDULER_CLASS = "TCDScheduler"


@cache
def _scheduler_parameters() -> frozenset[str]:
    """The names of ``TCDScheduler``'s constructor parameters."""
    return frozenset(n for n in inspect.signature(TCDScheduler.__init__).parameters if n != "self")


def scheduler_settings(
    teacher_config: Mapping[str, Any] | None = None,
    *,
    num_inference_steps: int = 4,
    eta: float = 0.3,
    guidance_scale: float | None = None,
    **parameters: Any,
) -> dict[str, Any]:
    """The card's ``scheduler`` section: how to sample the student with :class:`~tcd_sampler.TCDScheduler`.

    Args:
        teacher_config: the teacher's scheduler config (e.g. ``pipe.scheduler.config``); its noise schedule and
            prediction type (:data:`SCHEDULE_KEYS`, where present) are taken over, nothing else (its
            ``timestep_spacing``, ``steps_offset``, … are meant for the teacher's own sampler). Default None.
        num_inference_steps: the recommended number of steps. Default 4.
        eta: the recommended ``eta`` (TCD's ``γ``; 1 for an LCM student). Default 0.3, the paper's.
        guidance_scale: the recommended classifier-free guidance scale, if any. Default None.
        **parameters: further ``TCDScheduler`` constructor parameters, e.g. ``original_inference_steps`` (the
            distillation's skip grid, ``T // k``), ``timestep_spacing``, ``consistency_boundary=True`` and
            ``timestep_scaling`` for an LCM student; they override the teacher's values.

    Returns:
        ``{"class": "TCDScheduler", "config": {...}, "num_inference_steps": n, "eta": eta}`` (and
        ``guidance_scale``), the config holding constructor parameters only, with ``eta`` among them, so that
        ``step(eta=None)`` (the LCM pipelines) samples at the recommended value too.

    Raises:
        ValueError: a parameter is not one of ``TCDScheduler``'s, or the values do not build a scheduler.
    """
    config: dict[str, Any] = {}
    for key in SCHEDULE_KEYS:
        if teacher_config is not None and key in teacher_config:
            config[key] = teacher_config[key]
    config.update(parameters)
    if config.get("trained_betas") is not None:
        config["trained_betas"] = [float(b) for b in np.asarray(config["trained_betas"]).reshape(-1)]
    eta = check_number("eta", eta, 0.0, 1.0)
    config["eta"] = eta
    section: dict[str, Any] = {
        "class": _SCHEDULER_CLASS,
        "config": config,
        "num_inference_steps": num_inference_steps,
        "eta": eta,
    }
    if guidance_scale is not None:
        section["guidance_scale"] = guidance_scale
    _check_scheduler_section(section)
    return section


def _check_scheduler_section(section: Any) -> TCDScheduler:
    """The scheduler a card's ``scheduler`` section builds, after checking every entry (ValueError otherwise)."""
    if not isinstance(section, Mapping):
        raise ValueError(f"the card's 'scheduler' must be a mapping, got {type(section).__name__}")
    missing = [k for k in ("class", "config", "num_inference_steps", "eta") if k not in section]
    if missing:
        raise ValueError(f"the card's 'scheduler' lacks {missing} (build it with scheduler_settings)")
    if section["class"] != _SCHEDULER_CLASS:
        raise ValueError(f"the card's scheduler class must be {_SCHEDULER_CLASS!r}, got {section['class']!r}")
    unknown = sorted(set(section) - {"class", "config", "num_inference_steps", "eta", "guidance_scale"})
    if unknown:
        raise ValueError(f"the card's 'scheduler' has unknown entries {unknown}")
    config = section["config"]
    if not isinstance(config, Mapping):
        raise ValueError(f"the card's scheduler config must be a mapping, got {type(config).__name__}")
    foreign = sorted(str(k) for k in config if k not in _scheduler_parameters())
    if foreign:
        raise ValueError(
            f"the card's scheduler config holds {foreign[:5]}, which are not TCDScheduler parameters; take the "
            "schedule from a pipeline's scheduler config with scheduler_settings(pipe.scheduler.config, ...)"
        )
    try:
        check_int("the card's num_inference_steps", section["num_inference_steps"], 1)
        eta = check_number("the card's eta", section["eta"], 0.0, 1.0)
        if "eta" in config and float(config["eta"]) != eta:
            raise ValueError(f"the card's eta ({eta}) and its scheduler config's ({config['eta']}) differ")
        if section.get("guidance_scale") is not None:
            check_number("the card's guidance_scale", section["guidance_scale"], 0.0, math.inf)
        return TCDScheduler(**{"eta": eta, **config})
    except (TypeError, ValueError) as err:
        raise ValueError(f"the card's scheduler settings are invalid: {err}") from err


def _check_card(card: Any) -> None:
    if not isinstance(card, Mapping):
        raise ValueError(f"a card must be a mapping, got {type(card).__name__}")
    if card.get("format", CARD_FORMAT) != CARD_FORMAT:
        raise ValueError(f"not a tcd-sampler card: its format is {card.get('format')!r}, not {CARD_FORMAT!r}")
    version = card.get("format_version", CARD_FORMAT_VERSION)
    if version != CARD_FORMAT_VERSION:
        raise ValueError(f"card format version {version!r}; this tcd-sampler reads version {CARD_FORMAT_VERSION}")
    if "scheduler" not in card:
        raise ValueError("the card has no 'scheduler' section (build it with scheduler_settings)")
    if "steps" in card:
        try:
            check_int("the card's steps", card["steps"], 0)
        except TypeError as err:
            raise ValueError(str(err)) from err
    for key in ("config", "data"):
        if key in card and not isinstance(card[key], Mapping):
            raise ValueError(f"the card's {key!r} must be a mapping, got {type(card[key]).__name__}")
    _check_scheduler_section(card["scheduler"])


def _json_default(value: Any) -> Any:
    """numpy and torch values (a loss curve of tensors, numpy floats) as plain JSON values."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (Path, set, frozenset)):
        return str(value) if isinstance(value, Path) else sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def write_card(output_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``card`` as ``card.json`` in ``output_dir`` (created if missing), atomically.

    A card describes one student: ``config`` (the run's settings), ``data`` (what it was trained on), ``steps``
    (optimizer steps), ``loss`` (the loss curve), and ``scheduler`` (:func:`scheduler_settings`: the
    ``TCDScheduler`` config, the recommended steps and ``eta``), the one required entry; any further JSON-able
    entries are kept. ``format``/``format_version`` are added. Numpy and torch values are written as plain numbers
    and lists; NaN and infinities are refused (JSON has none: record a diverged loss as None).

    Args:
        output_dir: the folder; NotADirectoryError if it is a file or cannot be written.
        card: the card.

    Returns:
        The card's path.

    Raises:
        ValueError: the card has no valid ``scheduler`` section, or is not JSON-serializable.
    """
    if not isinstance(card, Mapping):
        raise ValueError(f"a card must be a mapping, got {type(card).__name__}")
    full = {"format": CARD_FORMAT, "format_version": CARD_FORMAT_VERSION, **card}
    try:
        text = json.dumps(full, indent=2, allow_nan=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"the card is not JSON-serializable: {err}") from err
    _check_card(json.loads(text))  # what load_card will read
    folder = Path(output_dir)
    problem = folder_problem(folder)
    if problem:
        raise NotADirectoryError(f"cannot write the card in {folder}: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_paths(folder / CARD_NAME) as (temp,):
        temp.write_text(text, encoding="utf-8")
    return folder / CARD_NAME


def load_card(path: str | Path) -> dict[str, Any]:
    """Read a card written by :func:`write_card`.

    Args:
        path: the card's folder, or the card file itself.

    Raises:
        FileNotFoundError: there is no card there.
        ValueError: the file is not a valid card.
    """
    file = Path(path)
    if file.is_dir():
        file = file / CARD_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no card at {file}")
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a JSON card: {err}") from err
    try:
        _check_card(card)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err
    return dict(card)


def scheduler_from_card(card: Mapping[str, Any] | str | Path) -> TCDScheduler:
    """The ``TCDScheduler`` a card says to sample its student with: its scheduler config, every entry passed to the
    constructor explicitly (so each takes effect), with the recommended ``eta`` as the scheduler's default.

    Args:
        card: a card (:func:`load_card`), or its folder or file.

    Returns:
        The scheduler; call ``set_timesteps(card["scheduler"]["num_inference_steps"])`` (or pass
        :func:`pipeline_kwargs` to a pipeline).
    """
    if not isinstance(card, Mapping):
        card = load_card(card)
    _check_card(card)
    return _check_scheduler_section(card["scheduler"])


def pipeline_kwargs(card: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The recommended pipeline-call arguments of a card: ``num_inference_steps``, ``eta`` and, when recorded,
    ``guidance_scale``, for ``pipe(prompt, **pipeline_kwargs(card))`` with ``pipe.scheduler`` from
    :func:`scheduler_from_card` (SD/SDXL pipelines; the LCM pipelines take no ``eta``: drop it, the scheduler's
    config holds the same value)."""
    if not isinstance(card, Mapping):
        card = load_card(card)
    _check_card(card)
    section = card["scheduler"]
    out = {"num_inference_steps": int(section["num_inference_steps"]), "eta": float(section["eta"])}
    if section.get("guidance_scale") is not None:
        out["guidance_scale"] = float(section["guidance_scale"])
    return out
