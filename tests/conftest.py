import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_diffusers_logs():
    """diffusers logs a warning per off-grid custom schedule; keep test output readable."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process, fixed by the first Accelerator (its mixed precision
    included); each test's runs start from none, as a new process would."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
