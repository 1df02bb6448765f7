"""``python -m umlcore``: the ``uml`` command line."""

import sys

from .cli import main

sys.exit(main())
