"""``torchvision.transforms.functional`` stand-in (ComfyUI's cosmos models call ``resize`` with a padding mask)."""

from __future__ import annotations

from typing import Any, NoReturn


def resize(*args: Any, **kwargs: Any) -> NoReturn:
    raise ImportError("torchvision.transforms.functional.resize is a test stub; install torchvision to use it")
