"""``python -m hiso``: the ``hiso`` command line."""

import sys

from .cli import main

sys.exit(main())
