"""``torchvision.models`` stand-in: ComfyUI's Stable Cascade coder/controlnet call ``efficientnet_v2_s`` only when
such a model is built."""

from __future__ import annotations

from typing import Any, NoReturn


def efficientnet_v2_s(*args: Any, **kwargs: Any) -> NoReturn:
    raise ImportError("torchvision.models.efficientnet_v2_s is a test stub; install torchvision to use it")
