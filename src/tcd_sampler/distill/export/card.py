"""The card (``card.json``) that says how to sample a student: its ``scheduler`` section (:func:`scheduler_settings`)
is everything :class:`~tcd_sampler.TCDScheduler` needs, beside the run's settings, data, steps and loss curve.

Needs neither diffusers, peft nor safetensors.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ..._checksums import sha256_file
from ..._files import atomic_paths, folder_problem
from ...core.checks import check_int, check_number
from ...schedulers.vp import TCDScheduler
from ._modes import give_plain_mode
from .lora import COMFYUI_SUFFIX, LORA_WEIGHT_NAME

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
#: The result files :func:`write_card` records in the card's ``files`` (patterns relative to the card's folder): the
#: LoRA in both formats (:func:`~tcd_sampler.distill.export.save_lora`), a pixel pipeline's index and scheduler
#: (:func:`~tcd_sampler.distill.export.save_pixel_pipeline`), and a model folder's config and weights, in ``unet/``
#: (:func:`~tcd_sampler.distill.export.save_full_student`) or beside the card.
RESULT_FILES = (
    LORA_WEIGHT_NAME,
    "*" + COMFYUI_SUFFIX,
    "model_index.json",
    "scheduler/scheduler_config.json",
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model*.safetensors.index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model*.safetensors",
    "unet/diffusion_pytorch_model*.safetensors.index.json",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    _recorded_files(card)
    _check_scheduler_section(card["scheduler"])


def _recorded_files(card: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """The card's ``files`` (relative path → (hex SHA-256, size in bytes)), empty when it records none; ValueError
    when the entry is malformed."""
    files = card.get("files")
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise ValueError(f"the card's 'files' must be a mapping, got {type(files).__name__}")
    out: dict[str, tuple[str, int]] = {}
    for name, entry in files.items():
        path = PurePosixPath(name) if isinstance(name, str) else None
        if path is None or not name or path.is_absolute() or ".." in path.parts or "\\" in name:
            raise ValueError(f"the card's 'files' holds {name!r}, not a relative path inside the card's folder")
        digest = entry.get("sha256") if isinstance(entry, Mapping) else None
        size = entry.get("bytes") if isinstance(entry, Mapping) else None
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest) or type(size) is not int or size < 0:
            raise ValueError(
                f"the card's 'files' entry {name!r} must be {{'sha256': <64 lower-case hex digits>, 'bytes': <size "
                f"≥ 0>}}, got {entry!r}"
            )
        out[name] = (digest, size)
    return out


def result_files(folder: str | Path) -> list[str]:
    """The result files in ``folder`` that :func:`write_card` records: those matching :data:`RESULT_FILES`, as
    paths relative to ``folder`` with ``/``, sorted (hidden names, such as unfinished temporary files, left out)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    names = set()
    for pattern in RESULT_FILES:
        for file in root.glob(pattern):
            relative = file.relative_to(root)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                names.add(relative.as_posix())
    return sorted(names)


def verify_card_files(
    folder: str | Path, card: Mapping[str, Any] | None = None, *, only: Iterable[str] | None = None
) -> list[str]:
    """Check the result files a card records (its ``files``, written by :func:`write_card`) against their SHA-256,
    before they are loaded; each unchanged file is hashed once per process. A card without ``files`` (written
    before cards recorded them, or by another tool) checks nothing.

    Args:
        folder: the card's folder; the recorded paths are relative to it.
        card: the card. Default None: ``folder``'s ``card.json`` when it is a tcd-sampler card (a missing, unreadable
            or foreign ``card.json`` checks nothing, so that any other model folder loads as before).
        only: the recorded paths to check, or folders (``"unet"``) whose recorded files to check. Default None:
            every recorded file. A recorded file that is missing is left for its loader to report.

    Returns:
        The paths checked.

    Raises:
        ValueError: a file's size or SHA-256 differs from the card's (the message names the file), or the card's
            ``files`` entry is malformed.
    """
    root = Path(folder)
    card_file = root / CARD_NAME
    if card is None:
        try:
            loaded = json.loads(card_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return []
        if not isinstance(loaded, Mapping) or loaded.get("format") != CARD_FORMAT:
            return []
        card = loaded
    try:
        recorded = _recorded_files(card)
    except ValueError as err:
        raise ValueError(f"{card_file}: {err}") from None
    wanted = None if only is None else [PurePosixPath(name).as_posix() for name in only]
    checked = []
    for name, (digest, size) in recorded.items():
        if wanted is not None and not any(name == w or name.startswith(w.rstrip("/") + "/") for w in wanted):
            continue
        file = root / name
        if not file.is_file():
            continue
        actual = file.stat().st_size
        if actual != size:
            raise ValueError(
                f"{file} is damaged ({actual} bytes; its card {card_file} records {size}): export it again or copy "
                "it again from where it was trained"
            )
        if sha256_file(file) != digest:
            raise ValueError(
                f"{file} is damaged (sha256 differs from the one its card {card_file} records): export it again or "
                "copy it again from where it was trained"
            )
        checked.append(name)
    return checked


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
    entries are kept. ``format``/``format_version`` are added, and ``files``: the SHA-256 and size of every result
    file already in ``output_dir`` (:func:`result_files`: the LoRA, the ``unet/`` folder, a pixel pipeline's index and
    scheduler), as ``{"unet/diffusion_pytorch_model.safetensors": {"sha256": ..., "bytes": ...}}``, which
    :func:`verify_card_files` checks before they load (so write the card after the files; a ``files`` entry given
    in ``card`` is replaced, and left out when there are none). Numpy and torch values are written as plain numbers
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
    full.pop("files", None)
    folder = Path(output_dir)
    names = result_files(folder)
    if names:
        full["files"] = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                         for name in names}  # fmt: skip
    try:
        text = json.dumps(full, indent=2, allow_nan=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"the card is not JSON-serializable: {err}") from err
    _check_card(json.loads(text))  # what load_card will read
    problem = folder_problem(folder)
    if problem:
        raise NotADirectoryError(f"cannot write the card in {folder}: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_paths(folder / CARD_NAME) as (temp,):
        temp.write_text(text, encoding="utf-8")
        give_plain_mode(temp)
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
