"""``python -m basin_volume.cli``: the same as ``basin-volume``."""

import sys

from .main import main

sys.exit(main())
