"""``python -m vitok.platform.tracking list|replay``: see ``spool_cli``."""

import sys

from vitok.platform.tracking.spool_cli import main

sys.exit(main())
