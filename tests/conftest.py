import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_diffusers_logs():
    """diffusers logs a warning per off-grid custom schedule; keep test output readable."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield
