"""``python -m bridge.demo``: the demo loop's own command line (compose runs it)."""

import sys

from bridge.demo.loop import main

sys.exit(main())
