"""``python -m benchlib --probe-memory ARG``: the fresh-process peak-memory probe of one (case, provider)."""

import sys

from .runner import _probe_main

if len(sys.argv) == 3 and sys.argv[1] == "--probe-memory":
    _probe_main(sys.argv[2])
else:
    from . import __doc__ as doc

    print(doc)
