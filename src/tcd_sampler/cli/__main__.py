"""``python -m tcd_sampler.cli``: the ``tcd-sampler`` command."""

from . import main

raise SystemExit(main())
