"""The main job on real images (``tcd-sampler demo`` / ``make demo``): scikit-learn's handwritten digits, a
class-conditional teacher trained here by ``tcd-sampler train --method diffusion``, its TCD and LCM students, and
their evaluation the way the paper evaluates SDXL.

- :mod:`.data`: the digits, the fixed split, the image folder the trainer reads;
- :mod:`.teacher`: the untrained teacher pipeline (architecture and noise schedule);
- :mod:`.classifier`: the digit classifier (feature space and class score);
- :mod:`.metrics`: FID (torchmetrics), class accuracy, precision and recall;
- :mod:`.models`: the shipped models and the compared samplers;
- :mod:`.demo`: the run; :mod:`.figure`: its image grid and curves.
"""

from .demo import run_digits_demo
from .models import DIGITS_ASSETS, load_models

__all__ = ["DIGITS_ASSETS", "load_models", "run_digits_demo"]
