"""Looking through the wrappers a trained model may sit in, for the LoRA and full-student writers."""

from __future__ import annotations

from typing import Any

import torch


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
