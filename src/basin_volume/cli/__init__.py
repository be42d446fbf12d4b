"""Command line: ``basin-volume demo | estimate | plot | compare | scan``.

Every command is a thin layer over Python functions of the same names:
``estimate`` -> :func:`basin_volume.runfile.run_to_file`, ``plot`` ->
:func:`basin_volume.plots.plot_results` (and :func:`~basin_volume.plots.plot_scan`),
``compare`` -> :func:`basin_volume.plots.compare_results`, ``scan`` ->
:func:`basin_volume.runfile.scan`. The model and data arguments are resolved by
:func:`load_model` and :func:`load_text_data`, also usable from Python.

A bad argument ends the command with one line naming the option and the fix, and exit status 2.

Modules: ``_types`` (argument types), ``data`` (text data), ``models`` (model loading),
``assemble`` (arguments to a run), ``commands`` (one function per command), ``parser``
(the argparse tree) and ``main`` (the entry point).
"""

from ._types import UsageError
from .data import load_text_data
from .main import main
from .models import LoadedModel, load_model
from .parser import build_parser

__all__ = ["LoadedModel", "UsageError", "build_parser", "load_model", "load_text_data", "main"]
