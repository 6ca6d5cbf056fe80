"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["gradkern", "gradkern.clipping", "gradkern.stats", "gradkern.clippers",
           "gradkern.events", "gradkern.layers", "gradkern.monitor", "gradkern.sinks",
           "gradkern.backends", "gradkern.tools.cases"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
