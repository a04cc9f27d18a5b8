"""``python -m bridge.demo.targets``."""

import sys

from bridge.demo.targets.cli import main

sys.exit(main())
