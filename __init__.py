"""ComfyUI's entry point for this repository cloned into ``ComfyUI/custom_nodes/`` (as ComfyUI Manager and the Comfy
Registry install nodes): the TCD nodes from this checkout's ``src/``, unless a ``tcd_sampler`` is imported already."""

import os
import sys

if "tcd_sampler" not in sys.modules:
    _SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
    if _SRC not in sys.path:
        sys.path.insert(0, _SRC)

from tcd_sampler.integrations.comfyui import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    register_ksampler_entry,
)

register_ksampler_entry()  # the stock KSampler's `tcd` entry (a no-op where it was added on import already)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
