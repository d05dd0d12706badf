"""The LoRA of a peft-adapted diffusers UNet, in diffusers' format (``pytorch_lora_weights.safetensors``, what
``pipe.load_lora_weights(folder)`` reads) and kohya's (``<name>_comfyui.safetensors``, what ComfyUI's LoRA loaders map).

diffusers, peft and safetensors are imported when called.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..._files import atomic_paths, folder_problem
from ._models import _is_a, _unwrap
from ._modes import give_plain_mode

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

#: The diffusers-format LoRA's file name (diffusers' ``LORA_WEIGHT_NAME_SAFE``, what ``load_lora_weights`` looks for).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The ComfyUI-format LoRA is ``<name>`` + this.
COMFYUI_SUFFIX = "_comfyui.safetensors"

_KOHYA_PREFIX = "lora_unet_"
# diffusers' metadata keys in a LoRA file; the caller's metadata may not replace them
_RESERVED_METADATA = ("format", "lora_adapter_metadata")


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
    they were. New files get the permissions a plain ``open()`` gives under the umask (as the card does), replaced
    ones keep theirs.

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
        for temp in (diffusers_tmp, comfy_tmp):  # safetensors writes 0600; a replaced file's mode carries over
            give_plain_mode(temp)
    return folder
