"""The examples in the docstrings run and show what they print (``doctest``)."""

import doctest
import importlib
import pkgutil
import warnings

import pytest

import basin_volume

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(basin_volume.__path__, "basin_volume.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["basin_volume", *MODULES])
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # an optional dependency (transformers, matplotlib) is missing
        pytest.skip(f"{name}: {err}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the low ESS of a 3-direction example
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
