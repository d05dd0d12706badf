"""What a distillation run hands its user: the LoRA in diffusers' and ComfyUI's formats, a full student as a diffusers
model folder, and the card (JSON) that says how to sample it.

- :func:`save_lora`: a peft LoRA on a diffusers ``UNet2DConditionModel`` (``unet.add_adapter(LoraConfig(...))``, as
  diffusers' LCM-LoRA script does, or peft's ``get_peft_model``) as ``pytorch_lora_weights.safetensors`` (diffusers'
  format: peft's ``lora_A``/``lora_B`` keys under ``unet.``, with the adapter's ``LoraConfig`` in the file's
  ``lora_adapter_metadata``, what ``pipe.load_lora_weights(folder)`` reads) and ``<name>_comfyui.safetensors``
  (kohya's ``lora_unet_*`` keys with ``.lora_down.weight``/``.lora_up.weight``/``.alpha``, which ComfyUI's LoRA
  loaders map; ComfyUI maps only some keys of diffusers' file), both written atomically.
- :func:`save_full_student`: ``save_pretrained`` into a temporary folder, renamed into place.
- :func:`write_card` / :func:`load_card` / :func:`scheduler_from_card`: the card, whose ``scheduler`` section
  (:func:`scheduler_settings`) is everything :class:`~tcd_sampler.TCDScheduler` needs to sample the student.

The LoRA and full-student writers import diffusers, peft and safetensors when called; the card needs none of them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._files import atomic_paths, folder_problem
from ..core.checks import check_int, check_number
from ..schedulers.vp import TCDScheduler

if TYPE_CHECKING:
    from diffusers import ModelMixin, UNet2DConditionModel

__all__ = [
    "CARD_FORMAT",
    "CARD_NAME",
    "COMFYUI_SUFFIX",
    "LORA_WEIGHT_NAME",
    "SCHEDULE_KEYS",
    "comfyui_lora_path",
    "load_card",
    "lora_state_dicts",
    "pipeline_kwargs",
    "save_full_student",
    "save_lora",
    "scheduler_from_card",
    "scheduler_settings",
    "write_card",
]

#: The diffusers-format LoRA's file name (diffusers' ``LORA_WEIGHT_NAME_SAFE``, what ``load_lora_weights`` looks for).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The ComfyUI-format LoRA is ``<name>`` + this.
COMFYUI_SUFFIX = "_comfyui.safetensors"
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

_KOHYA_PREFIX = "lora_unet_"
_SCHEDULER_CLASS = "TCDScheduler"
# diffusers' metadata keys in a LoRA file; the caller's metadata may not replace them
_RESERVED_METADATA = ("format", "lora_adapter_metadata")
# what save_pretrained writes into a model folder (a folder holding only these, and a card, may be replaced)
_MODEL_FILES = re.compile(
    r"config\.json|diffusion_pytorch_model.*\.(safetensors|bin)(\.index\.json)?|" + re.escape(CARD_NAME)
)


# ------------------------------------------------------------------------------------------------------------ LoRA


def _unwrap(model: Any) -> Any:
    """The module under DDP (``.module``), ``torch.compile`` (``._orig_mod``) and peft's ``PeftModel`` wrappers."""
    from peft import PeftModel

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, PeftModel):
            model = model.get_base_model()
        else:
            return model


def _is_a(value: Any, cls: Any) -> bool:
    """``isinstance`` without narrowing: mypy sees diffusers' model classes without torch's ``Module`` base."""
    return isinstance(value, cls)


def _lora_layers(unet: Any, adapter_name: str) -> tuple[Any, Any, list[tuple[str, Any]]]:
    """The UNet under its wrappers, the adapter's ``LoraConfig`` and its LoRA layers ``(module name, layer)``, after
    checking that the adapter is a plain LoRA both formats can hold."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    base = _unwrap(unet)
    if not _is_a(base, UNet2DConditionModel):
        raise TypeError(f"unet must be a diffusers UNet2DConditionModel (peft-wrapped), got {type(base).__name__}")
    configs = getattr(base, "peft_config", None) or {}
    if adapter_name not in configs:
        known = ", ".join(map(repr, configs)) or "none"
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r} (adapters: {known}); add one with "
            "unet.add_adapter(LoraConfig(r=..., lora_alpha=..., target_modules=[...]))"
        )
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a LoRA (peft's LoraConfig)")
    unsupported = {
        "use_dora": bool(config.use_dora),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "bias": config.bias != "none",
        "modules_to_save": bool(config.modules_to_save),
        "target_parameters": bool(getattr(config, "target_parameters", None)),
    }
    if any(unsupported.values()):
        named = ", ".join(k for k, v in unsupported.items() if v)
        raise ValueError(f"adapter {adapter_name!r} uses {named}; only plain LoRA layers (A, B, alpha) are exported")
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers in the UNet")
    for name, layer in layers:
        kind = layer.get_base_layer()
        if type(kind) not in (torch.nn.Linear, torch.nn.Conv2d):
            raise ValueError(
                f"the LoRA layer {name} wraps a {type(kind).__name__}; only Linear and Conv2d are exported"
            )
    return base, config, layers


def _alpha(name: str, layer: Any, config: Any, adapter_name: str) -> float:
    """The kohya ``alpha`` of one layer: ``scaling · rank`` (ComfyUI scales ``up @ down`` by ``alpha / rank``), so
    rsLoRA and peft's ``alpha_pattern``/``rank_pattern`` carry over. Without patterns the layer's scaling must be the
    config's (one changed by ``set_scale`` would make the two files disagree)."""
    rank = int(layer.r[adapter_name])
    scaling = float(layer.scaling[adapter_name])
    if not config.alpha_pattern and not config.rank_pattern:
        expected = config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)
        if not math.isclose(scaling, expected, rel_tol=1e-6):
            raise ValueError(
                f"the LoRA layer {name} scales by {scaling}, not lora_alpha/r = {expected} (changed by set_scale?); "
                "restore it before saving, since diffusers' file records the config's alpha"
            )
    return scaling * rank


def lora_state_dicts(
    unet: UNet2DConditionModel | torch.nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA of ``unet`` in both formats, on the CPU, without writing anything.

    Args:
        unet: a ``UNet2DConditionModel`` with a peft LoRA adapter (``unet.add_adapter``), or peft's ``PeftModel``
            around one; DDP and ``torch.compile`` wrappers are looked through.
        adapter_name: the adapter to export. Default ``"default"``.

    Returns:
        ``(diffusers, comfyui, config)``: peft's state dict (``get_peft_model_state_dict``: ``<module>.lora_A.weight``
        and ``.lora_B.weight``, without the ``unet.`` prefix that diffusers' writer adds); kohya's
        (``lora_unet_<module with _>.lora_down.weight`` = A, ``.lora_up.weight`` = B, ``.alpha`` = ``scaling · rank``
        as a float32 scalar); and the adapter's ``LoraConfig.to_dict()`` (diffusers' ``lora_adapter_metadata``).

    Raises:
        TypeError: ``unet`` is not a UNet2DConditionModel.
        ValueError: it has no such adapter, or the adapter is not a plain LoRA of Linear/Conv2d layers (DoRA, LoRA
            biases, ``modules_to_save``, trainable tokens).
    """
    from peft.utils import get_peft_model_state_dict

    base, config, layers = _lora_layers(unet, adapter_name)
    peft_sd = get_peft_model_state_dict(base, adapter_name=adapter_name)
    expected = {f"{n}.lora_{ab}.weight" for n, _ in layers for ab in "AB"}
    if set(peft_sd) != expected:
        extra = sorted(set(peft_sd) ^ expected)[:5]
        raise ValueError(f"adapter {adapter_name!r} holds more than LoRA A/B weights (e.g. {extra}); not exported")
    diffusers_sd = {k: v.detach().to("cpu").contiguous() for k, v in peft_sd.items()}
    comfy_sd: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        key = _KOHYA_PREFIX + name.replace(".", "_")
        comfy_sd[f"{key}.lora_down.weight"] = diffusers_sd[f"{name}.lora_A.weight"]
        comfy_sd[f"{key}.lora_up.weight"] = diffusers_sd[f"{name}.lora_B.weight"]
        comfy_sd[f"{key}.alpha"] = torch.tensor(_alpha(name, layer, config, adapter_name), dtype=torch.float32)
    if len(comfy_sd) != 3 * len(layers):
        raise ValueError(f"two LoRA layers of adapter {adapter_name!r} share one kohya name; not exported")
    return diffusers_sd, comfy_sd, config.to_dict()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or re.search(r"[/\\\0]", name):
        raise ValueError(f"name must be a plain, non-hidden file name stem, got {name!r}")
    return name


def comfyui_lora_path(output_dir: str | Path, name: str | None = None) -> Path:
    """Where :func:`save_lora` writes the ComfyUI-format file: ``<output_dir>/<name>_comfyui.safetensors``, ``name``
    defaulting to the folder's own name (ComfyUI lists a LoRA by its file name)."""
    folder = Path(output_dir)
    if name is None:
        name = folder.resolve().name or "lora"
    return folder / (_check_name(name) + COMFYUI_SUFFIX)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    strings = isinstance(metadata, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    )
    if not strings:
        raise TypeError("metadata must map str to str (safetensors' header holds strings)")
    reserved = sorted(set(metadata) & set(_RESERVED_METADATA))
    if reserved:
        raise ValueError(f"metadata may not set {reserved}: diffusers' loader reads them")
    return dict(metadata)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], shown: Path) -> None:
    import safetensors.torch  # the module, so that its save_file is looked up at call time

    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    except Exception as err:  # safetensors' own error type (a full disk, …) is not an OSError
        raise OSError(f"could not write {shown}: {err}") from err


def _diffusers_metadata(config: dict[str, Any]) -> str:
    """``lora_adapter_metadata`` as diffusers' ``write_lora_layers`` serialises it: the config's keys under the
    ``unet.`` prefix, sets as lists, JSON with ``indent=2, sort_keys=True``."""
    packed = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return json.dumps(packed, indent=2, sort_keys=True)


def save_lora(
    unet: UNet2DConditionModel | torch.nn.Module,
    output_dir: str | Path,
    *,
    adapter_name: str = "default",
    metadata: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Path:
    """Write the LoRA of ``unet`` in diffusers' and ComfyUI's formats into ``output_dir`` (created if missing).

    ``pytorch_lora_weights.safetensors`` is written by diffusers' ``StableDiffusionPipeline.save_lora_weights`` from
    peft's ``get_peft_model_state_dict`` (the LCM-LoRA script's save, without ``convert_state_dict_to_diffusers``,
    whose mix of key formats for a LoRA on convolutions too makes ``load_lora_weights`` drop the attention layers),
    with the ``LoraConfig`` as ``lora_adapter_metadata``, so ``pipe.load_lora_weights(output_dir)`` (SD and SDXL
    pipelines) restores rank, alpha and target modules. ``<name>_comfyui.safetensors`` holds the same weights with
    kohya's keys (see :func:`lora_state_dicts`; diffusers' ``convert_state_dict_to_kohya`` would write
    ``alpha = rank``, losing ``lora_alpha``). Both are written to temporary files and renamed into place
    (:func:`~tcd_sampler._files.atomic_paths`): a failure leaves neither half-written, and files already there as
    they were.

    Args:
        unet: the student, see :func:`lora_state_dicts`.
        output_dir: the folder; NotADirectoryError if it is a file or cannot be written.
        adapter_name: the adapter to export. Default ``"default"``.
        metadata: extra safetensors header entries (str → str) for both files, e.g. the run's settings; may not set
            ``format`` or ``lora_adapter_metadata``. Default None.
        name: the ComfyUI file's stem. Default: the folder's name.

    Returns:
        The folder (what ``load_lora_weights`` takes); :func:`comfyui_lora_path` gives the ComfyUI file.
    """
    from diffusers import StableDiffusionPipeline

    user = _check_metadata(metadata)
    folder = Path(output_dir)
    comfy_path = comfyui_lora_path(folder, name)
    diffusers_sd, comfy_sd, config = lora_state_dicts(unet, adapter_name)
    problem = folder_problem(folder)
    if problem:
        raise NotADirectoryError(f"cannot save the LoRA in {folder}: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    diffusers_header = {"format": "pt", "lora_adapter_metadata": _diffusers_metadata(config), **user}
    with atomic_paths(folder / LORA_WEIGHT_NAME, comfy_path) as (diffusers_tmp, comfy_tmp):

        def save_function(weights: dict[str, torch.Tensor], filename: str) -> None:
            _save_safetensors(weights, Path(filename), diffusers_header, folder / LORA_WEIGHT_NAME)

        StableDiffusionPipeline.save_lora_weights(
            save_directory=diffusers_tmp.parent,
            unet_lora_layers=diffusers_sd,
            weight_name=diffusers_tmp.name,
            save_function=save_function,
            safe_serialization=True,
        )
        _save_safetensors(comfy_sd, comfy_tmp, {"format": "pt", **user}, comfy_path)
    return folder


# -------------------------------------------------------------------------------------------------- full student


def save_full_student(unet: ModelMixin | torch.nn.Module, output_dir: str | Path) -> Path:
    """Write a full (not LoRA) student as a diffusers model folder, ``config.json`` plus safetensors weights, which
    ``UNet2DConditionModel.from_pretrained(output_dir)`` (or the model's own class) loads.

    ``save_pretrained`` writes into a temporary folder beside ``output_dir``, which is then renamed onto it, so the
    folder is never half-written. An existing ``output_dir`` is replaced only when it holds nothing but what
    ``save_pretrained`` writes (and a card, which described the old student; write the new card afterwards): it is
    renamed aside, the new folder renamed into place, and the old one removed (a crash between the two renames
    leaves the old folder under a hidden name beside it, never a partial one).

    Args:
        unet: a diffusers model (``ModelMixin``) without peft adapters; DDP and ``torch.compile`` wrappers are looked
            through.
        output_dir: the model folder.

    Returns:
        The folder.

    Raises:
        TypeError: not a diffusers model.
        ValueError: the model carries peft adapters (save those with :func:`save_lora`, or merge them first).
        FileExistsError: ``output_dir`` holds other files.
        NotADirectoryError: ``output_dir`` is a file, or its parent cannot be written.
    """
    from diffusers import ModelMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _unwrap(unet)
    if not _is_a(model, ModelMixin):
        raise TypeError(f"unet must be a diffusers model (ModelMixin), got {type(model).__name__}")
    if getattr(model, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model carries peft adapters; save them with save_lora, or merge them into the weights first "
            "(unet.fuse_lora() / peft's merge_and_unload) and remove the adapters"
        )
    target = Path(output_dir)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"cannot save the student in {target}: it is a file, not a folder")
        foreign = sorted(p.name for p in target.iterdir() if not _MODEL_FILES.fullmatch(p.name))
        if foreign:
            raise FileExistsError(
                f"{target} holds files that are not a diffusers model's ({', '.join(foreign[:5])}); "
                "choose an empty or new folder for the student"
            )
    parent = target.absolute().parent
    problem = folder_problem(parent)
    if problem:
        raise NotADirectoryError(f"cannot save the student in {target}: {problem}")
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        model.save_pretrained(temp, safe_serialization=True)
        _swap_folder(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _swap_folder(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is renamed aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=new.parent))
    os.replace(target, old)  # onto the empty folder just made: atomic
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ card


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
