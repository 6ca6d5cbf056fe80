"""Shared fixtures (the helpers they use are in ``helpers.py``)."""

from __future__ import annotations

import pytest

from helpers import CPU_BACKENDS, use_backend


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test under each CPU backend."""
    yield from use_backend(request.param)
