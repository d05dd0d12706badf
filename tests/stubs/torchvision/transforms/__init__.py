"""``torchvision.transforms`` stand-in: the names ComfyUI's cosmos and ACE model files bind at import."""

from __future__ import annotations

import enum
from typing import Any, NoReturn

from . import functional

__all__ = ["Compose", "InterpolationMode", "Normalize", "functional"]


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ImportError(f"torchvision.transforms.{type(self).__name__} is a test stub; install torchvision")


class Compose(_Unavailable):
    pass


class Normalize(_Unavailable):
    pass
