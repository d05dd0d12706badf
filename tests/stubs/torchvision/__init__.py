"""A stand-in for torchvision, for importing the vendored ComfyUI in tests only (tests/comfy_env.py).

No torchvision wheel for the pinned torch is reachable on the project's machines, and ComfyUI imports it at module
level in model files the sampling path never calls (``comfy/ldm/cosmos``, ``comfy/ldm/cascade``,
``comfy/ldm/ace``). This package provides just the names those imports bind; using any of them raises. It is put on
``sys.path`` only while ComfyUI is imported, and only when the real torchvision is not importable.
"""

from . import models, transforms

__all__ = ["models", "transforms"]
