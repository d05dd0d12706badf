"""What a distillation run hands its user: the LoRA in diffusers' and ComfyUI's formats, a full student as a diffusers
model folder, and the card (JSON) that says how to sample it.

- :func:`save_lora`: a peft LoRA on a diffusers ``UNet2DConditionModel`` (``unet.add_adapter(LoraConfig(...))``, as
  diffusers' LCM-LoRA script does, or peft's ``get_peft_model``) as ``pytorch_lora_weights.safetensors`` (diffusers'
  format: peft's ``lora_A``/``lora_B`` keys under ``unet.``, with the adapter's ``LoraConfig`` in the file's
  ``lora_adapter_metadata``, what ``pipe.load_lora_weights(folder)`` reads) and ``<name>_comfyui.safetensors``
  (kohya's ``lora_unet_*`` keys with ``.lora_down.weight``/``.lora_up.weight``/``.alpha``, which ComfyUI's LoRA
  loaders map; ComfyUI maps only some keys of diffusers' file), both written atomically.
- :func:`save_full_student`: ``save_pretrained`` into a temporary folder, renamed into place;
  :func:`save_pixel_pipeline`: that, the scheduler and ``model_index.json``, for a pixel-space pipeline.
- :func:`write_card` / :func:`load_card` / :func:`scheduler_from_card`: the card, whose ``scheduler`` section
  (:func:`scheduler_settings`) is everything :class:`~tcd_sampler.TCDScheduler` needs to sample the student, and
  whose ``files`` (the SHA-256 of the results beside it) :func:`verify_card_files` checks before they load.

The LoRA and full-student writers import diffusers, peft and safetensors when called; the card needs none of them.
"""

from .card import (
    CARD_FORMAT,
    CARD_NAME,
    RESULT_FILES,
    SCHEDULE_KEYS,
    load_card,
    pipeline_kwargs,
    result_files,
    scheduler_from_card,
    scheduler_settings,
    verify_card_files,
    write_card,
)
from .card import CARD_FORMAT_VERSION as CARD_FORMAT_VERSION  # re-exported, as before, though not in __all__
from .lora import COMFYUI_SUFFIX, LORA_WEIGHT_NAME, comfyui_lora_path, lora_state_dicts, save_lora
from .student import is_pixel_pipeline, save_full_student, save_pixel_pipeline

__all__ = [
    "CARD_FORMAT",
    "CARD_NAME",
    "COMFYUI_SUFFIX",
    "LORA_WEIGHT_NAME",
    "RESULT_FILES",
    "SCHEDULE_KEYS",
    "comfyui_lora_path",
    "is_pixel_pipeline",
    "load_card",
    "lora_state_dicts",
    "pipeline_kwargs",
    "result_files",
    "save_full_student",
    "save_lora",
    "save_pixel_pipeline",
    "scheduler_from_card",
    "scheduler_settings",
    "verify_card_files",
    "write_card",
]
